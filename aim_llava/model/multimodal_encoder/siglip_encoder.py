"""SigLIP vision tower, built from a :class:`VisionConfig`; weights come from the LLaVA checkpoint.

Module names follow the checkpoint (``vision_tower.vision_model.embeddings...``) so that the
state dict loads without renaming. Like the LLaVA checkpoints, the tower has no post-layernorm
and no pooling head: the output is the last kept encoder layer's hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aim_llava.model.attention import attend
from aim_llava.model.config import VisionConfig
from aim_llava.reduction.tokens import LayerAttention, VisionReducer


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        return patches + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, attn_implementation: str, return_attention: bool = False):
        b, n, _ = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        seen = LayerAttention(q, k, self.head_dim**-0.5) if return_attention else None
        out = attend(q, k, v, None, False, self.head_dim**-0.5, attn_implementation)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1)), seen


class SiglipMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor, attn_implementation: str, return_attention: bool = False):
        attended, seen = self.self_attn(self.layer_norm1(x), attn_implementation, return_attention)
        x = x + attended
        return x + self.mlp(self.layer_norm2(x)), seen


class SiglipEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)


class SiglipVisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(config)


class SigLipVisionTower(nn.Module):
    """The tower as LLaVA holds it: ``model.vision_tower.vision_tower.vision_model``."""

    def __init__(self, config: VisionConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.attn_implementation = attn_implementation
        self.vision_tower = SiglipVisionModel(config)

    def forward(self, pixel_values: torch.Tensor, reducer: VisionReducer | None = None) -> torch.Tensor:
        """[N, 3, H, W] normalised pixels -> [N, patches, hidden] features.

        A ``reducer`` may remove patches after any layer (the same number from every view).
        """
        model = self.vision_tower.vision_model
        hidden = model.embeddings(pixel_values)
        for index, layer in enumerate(model.encoder.layers):
            wants = reducer is not None and reducer.wants_attention(index)
            hidden, seen = layer(hidden, self.attn_implementation, wants)
            if reducer is not None:
                hidden = reducer.after_layer(index, hidden, seen)
        return hidden
