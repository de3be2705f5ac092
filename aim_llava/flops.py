"""The paper's compute accounting (SPEC section 4): LLM prefill FLOPs from tokens per layer."""

from __future__ import annotations

from aim_llava.model.config import TextConfig


def layer_linear_params(text: TextConfig) -> int:
    """Weights of one decoder layer's linear maps (q, k, v, o, gate, up, down)."""
    h, kv = text.hidden_size, text.num_key_value_heads * text.head_dim
    return h * h * 2 + h * kv * 2 + h * text.intermediate_size * 3


def prefill_flops(text: TextConfig, tokens_per_layer: list[int]) -> float:
    """Sum over layers of 2 n P + 4 n^2 H for n tokens entering the layer."""
    params = layer_linear_params(text)
    return float(sum(2 * n * params + 4 * n * n * text.hidden_size for n in tokens_per_layer))
