"""Our Qwen2 decoder: the layer loop in plain sight, explicit position ids and KV cache.

Numerically it follows transformers' ``Qwen2Model`` (RMSNorm in float32, rotary embeddings with
``rope_theta``, q/k/v projections with bias, SwiGLU MLP). The loop is ours because token
reduction acts between layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aim_llava.model.attention import attend
from aim_llava.model.config import TextConfig
from aim_llava.model.language_model.kv_cache import KVCache, LayerCache
from aim_llava.reduction.tokens import LayerAttention, LayerReducer, TokenState
from aim_llava.tensors import to_device


class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding:
    """cos/sin of the rotary embedding for position ids, looked up in tables built once per device
    and dtype for every position up to ``max_positions`` (a gather: no per-step computation, and
    fixed shapes for a captured decoding step).

    Multimodal RoPE (``mrope_section``, Qwen2-VL's): positions [..., 3] hold (time, height, width)
    and rotary pair i takes the axis whose section of ``mrope_section`` it falls in (the first
    ``mrope_section[0]`` pairs time, the next height, the rest width; both halves of the head
    alike). Positions with equal axes, and plain positions [...], give the 1-D embedding."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, mrope_section: tuple[int, ...] | None = None):
        self.head_dim = head_dim
        self.theta = theta
        self.max_positions = max_positions
        self.tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.channel_axes: list[int] | None = None  # with multimodal RoPE: the axis each channel turns with
        self.axis_tables: dict[torch.device, torch.Tensor] = {}
        if mrope_section is not None:
            if sum(mrope_section) != head_dim // 2:
                raise ValueError(f"mrope_section {list(mrope_section)} must add up to half the head size {head_dim}")
            axes = [axis % 3 for axis, size in enumerate(mrope_section) for _ in range(size)]
            self.channel_axes = axes + axes

    def table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (torch.device(device), dtype)
        if key not in self.tables:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
            inv_freq = 1.0 / (self.theta**exponent)
            freqs = torch.arange(self.max_positions, device=device).float()[:, None] * inv_freq
            emb = torch.cat([freqs, freqs], dim=-1)
            self.tables[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self.tables[key]

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, L, head_dim] for position ids [B, L] (or [B, L, 3] with multimodal RoPE)."""
        cos, sin = self.table(position_ids.device, dtype)
        if position_ids.dim() == 2:
            return cos[position_ids], sin[position_ids]
        if self.channel_axes is None:
            raise ValueError("positions with (time, height, width) axes need a model with multimodal RoPE")
        device = position_ids.device
        if device not in self.axis_tables:
            self.axis_tables[device] = to_device(torch.tensor(self.channel_axes), device)
        axis = self.axis_tables[device].expand(*position_ids.shape[:-1], -1)
        per_channel = position_ids.gather(-1, axis)  # [B, L, head_dim]: each channel's position
        channel = torch.arange(self.head_dim, device=position_ids.device)
        return cos[per_channel, channel], sin[per_channel, channel]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, L, d]; cos/sin: [B, L, d]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention_mask(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """[B, 1, Lq, Lk] boolean mask: causal over key indices, keys not valid removed.

    The new queries are the last ``q_len`` keys. A query that could see nothing (a padding row)
    sees itself, so it gets a defined (ignored) output instead of NaN.
    """
    k_len = key_valid.shape[1]
    q_idx = torch.arange(k_len - q_len, k_len, device=key_valid.device)[:, None]
    k_idx = torch.arange(k_len, device=key_valid.device)[None, :]
    mask = (k_idx <= q_idx)[None] & key_valid[:, None, :]
    mask |= ~mask.any(dim=-1, keepdim=True) & (k_idx == q_idx)
    return mask[:, None]


class AttentionMasks:
    """The masks of one decoder pass (:func:`attention_mask`), each built once: layers whose keys
    have the same validity (the same tensor, unchanged since) share one, so a padded batch builds
    its [B, 1, L, L] mask once per token state instead of once per layer."""

    def __init__(self):
        self.key_valid: torch.Tensor | None = None
        self.version = self.q_len = -1
        self.mask: torch.Tensor | None = None

    def __call__(self, key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
        if key_valid is not self.key_valid or key_valid._version != self.version or q_len != self.q_len:
            self.key_valid, self.version, self.q_len = key_valid, key_valid._version, q_len
            self.mask = attention_mask(key_valid, q_len)
        return self.mask


class Qwen2Attention(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, keys and values with rotary embeddings applied, each [B, heads, L, d]."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        valid: torch.Tensor,
        padded: bool,
        cache: KVCache | None,
        attn_implementation: str,
        return_attention: bool = False,
        masks: AttentionMasks | None = None,
    ) -> tuple[torch.Tensor, LayerAttention | None]:
        """``valid`` [B, L] marks the new tokens others may attend to; with ``return_attention``
        the rotated queries and keys of the new tokens come back for token scoring; ``masks``
        shares the attention masks between the layers of a pass."""
        q, k, v = self.project(x, cos, sin)
        seen = LayerAttention(q, k, self.head_dim**-0.5) if return_attention else None
        key_valid = valid
        if cache is not None:
            entry = cache.append(self.layer_idx, k, v, valid, padded)
            if entry.length > q.shape[2]:  # keys cached before these tokens (else entry.valid equals valid)
                key_valid = entry.valid
            k, v, padded = entry.keys, entry.values, entry.padded
        mask = (masks or AttentionMasks())(key_valid, q.shape[2]) if padded else None
        out = attend(q, k, v, mask, True, self.head_dim**-0.5, attn_implementation)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)), seen

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache,
             write_index: torch.Tensor, attn_implementation: str) -> torch.Tensor:
        """One new token per sample, x [B, 1, H]: its key and value are written into the layer's
        preallocated buffers at ``write_index`` (a device tensor) and it attends over the whole
        buffer, masked to the written entries: fixed shapes, no host values."""
        q, k, v = self.project(x, cos, sin)
        cache.write(k, v, write_index)
        mask = cache.valid_buffer[:, None, None, :]
        out = attend(q, cache.key_buffer, cache.value_buffer, mask, False, self.head_dim**-0.5, attn_implementation)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], 1, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, valid, padded, cache, attn_implementation, return_attention=False, masks=None):
        attended, seen = self.self_attn(
            self.input_layernorm(x), cos, sin, valid, padded, cache, attn_implementation, return_attention, masks
        )
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), seen

    def step(self, x, cos, sin, cache: LayerCache, write_index: torch.Tensor, attn_implementation: str):
        x = x + self.self_attn.step(self.input_layernorm(x), cos, sin, cache, write_index, attn_implementation)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embeddings, decoder layers and final norm (checkpoint names ``model.*``)."""

    def __init__(self, config: TextConfig, attn_implementation: str = "sdpa", max_positions: int | None = None):
        super().__init__()
        self.text_config = config
        self.attn_implementation = attn_implementation
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta,
                                      max(config.max_position_embeddings, max_positions or 0), config.mrope_section)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        valid: torch.Tensor,
        padded: bool,
        cache: KVCache | None = None,
        visual: torch.Tensor | None = None,
        reducer: LayerReducer | None = None,
        attn_implementation: str | None = None,
        num_visual: list[int] | None = None,
        rows: list[int] | None = None,
    ) -> tuple[torch.Tensor, TokenState, list[list[int]]]:
        """Run the decoder over new tokens.

        inputs_embeds [B, L, H]; position_ids [B, L] (or [B, L, 3]: multimodal RoPE); valid [B, L]
        marks real tokens and ``padded`` whether any is False; visual [B, L] marks visual tokens, of which each sample
        holds ``num_visual[b]`` among its ``rows[b]`` real rows (host counts: the loop never reads
        a value back from the device). With a cache, the tokens attend to everything cached before
        them and are appended to it (each layer caches the tokens that entered it). A ``reducer``
        may drop or mask tokens after any layer.
        Returns the final-norm hidden states of the remaining tokens, their :class:`TokenState`,
        and the visual tokens that entered each layer, per sample ([layer][sample]).
        """
        implementation = attn_implementation or self.attn_implementation
        state = TokenState.start(inputs_embeds, position_ids, valid, visual, padded, num_visual, rows)
        state, entering = self.run_layers(state, range(len(self.layers)), cache, reducer, implementation)
        return self.norm(state.hidden), state, entering

    def run_layers(self, state: TokenState, layers: range, cache: KVCache | None, reducer: LayerReducer | None,
                   implementation: str) -> tuple[TokenState, list[list[int]]]:
        """Run the decoder layers ``layers`` (consecutive) over the state's tokens, with the
        reducer acting after each; returns the state leaving the last one (no final norm) and the
        visual tokens that entered each, per sample."""
        cos, sin = self.rotary(state.position_ids, state.hidden.dtype)
        entering, masks = [], AttentionMasks()
        for index in layers:
            entering.append(list(state.live_visual))
            wants = reducer is not None and reducer.wants_attention(index)
            state.hidden, seen = self.layers[index](state.hidden, cos, sin, state.alive, state.padded, cache,
                                                    implementation, wants, masks)
            if reducer is not None:
                positions = state.position_ids
                state = reducer.after_layer(index, state, seen)
                if state.position_ids is not positions:
                    cos, sin = self.rotary(state.position_ids, state.hidden.dtype)
        return state, entering

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, step: torch.Tensor, cache: KVCache,
             attn_implementation: str | None = None) -> torch.Tensor:
        """One decoding step with fixed shapes: tokens [B] at positions [B] (device tensors), the
        step's index [1] (device). Layer l writes at its prefill length + step. Returns the
        final-norm hidden states [B, H]."""
        implementation = attn_implementation or self.attn_implementation
        x = self.embed_tokens(tokens)[:, None]
        cos, sin = self.rotary(positions[:, None], x.dtype)
        for layer, entry in zip(self.layers, cache.layers):
            x = layer.step(x, cos, sin, entry, entry.length + step, implementation)
        return self.norm(x)[:, 0]
