"""Compute and memory formulas of the architecture: pure arithmetic on the model config.

The paper's accounting (docs/algorithms.md §4): a decoder layer that sees n
tokens costs 2 n P + 4 n^2 H FLOPs, P being its linear weights and H the hidden size.
"""

from __future__ import annotations

from aim_llava.model.config import LlavaConfig, TextConfig, VisionConfig


def layer_linear_params(text: TextConfig) -> int:
    """Weights of one decoder layer's linear maps (q, k, v, o, gate, up, down)."""
    h, kv = text.hidden_size, text.num_key_value_heads * text.head_dim
    return h * h * 2 + h * kv * 2 + h * text.intermediate_size * 3


def prefill_flops(text: TextConfig, tokens_per_layer: list[int]) -> float:
    """Sum over layers of 2 n P + 4 n^2 H for n tokens at the layer."""
    params = layer_linear_params(text)
    return float(sum(2 * n * params + 4 * n * n * text.hidden_size for n in tokens_per_layer))


def vision_flops(vision: VisionConfig, views: int, patches_per_layer: list[int] | None = None) -> float:
    """SigLIP tower over ``views`` images: patch embedding plus the encoder layers that run, each
    with the patches entering it (all of them unless a method removes some in the tower)."""
    c = vision.hidden_size
    patches_per_layer = patches_per_layer or [vision.num_patches] * vision.num_hidden_layers
    embed = 2 * vision.num_patches * vision.num_channels * vision.patch_size**2 * c
    layers = sum(2 * n * (4 * c * c + 2 * c * vision.intermediate_size) + 4 * n * n * c for n in patches_per_layer)
    return float(views * (embed + layers))


def projector_flops(config: LlavaConfig, views: int) -> float:
    h = config.text.hidden_size
    return float(views * 2 * config.vision.num_patches * (config.vision.hidden_size * h + h * h))


def decode_flops(text: TextConfig, cache_tokens_per_layer: list[int]) -> float:
    """One generated token: linear maps plus attention over each layer's cache (and itself)."""
    params = layer_linear_params(text)
    return float(sum(2 * params + 4 * (n + 1) * text.hidden_size for n in cache_tokens_per_layer))


def kv_cache_bytes(text: TextConfig, cache_tokens_per_layer: list[int], bytes_per_value: int = 2) -> int:
    per_token = 2 * text.num_key_value_heads * text.head_dim * bytes_per_value
    return sum(n * per_token for n in cache_tokens_per_layer)
