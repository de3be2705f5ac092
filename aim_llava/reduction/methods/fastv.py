"""FastV (Chen et al. 2024): after layer K-1, keep the visual tokens that the last prompt token
attends to most (docs/algorithms.md §5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aim_llava.reduction.importance import grouped_logits
from aim_llava.reduction.plan import PruningPlan, RecordingReducer
from aim_llava.reduction.schedule import ScheduleError, check_layer
from aim_llava.reduction.tokens import (
    PRUNE_MODES,
    LayerAttention,
    TokenState,
    keep_top_visual,
)


@dataclass(frozen=True)
class FastVOptions:
    """layer: K, the first layer without the dropped tokens (scores come from layer K - 1);
    drop_ratio: R, the share of the visual tokens dropped; prune_mode: "remove" or "mask"."""

    layer: int = 2
    drop_ratio: float = 0.5
    prune_mode: str = "remove"

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_ratio <= 1.0:
            raise ScheduleError(f"drop_ratio={self.drop_ratio} must lie in [0, 1]")
        if self.prune_mode not in PRUNE_MODES:
            raise ScheduleError(f"prune_mode={self.prune_mode!r} is not one of {', '.join(PRUNE_MODES)}")


def last_token_attention(attention: LayerAttention, key_mask: torch.Tensor) -> torch.Tensor:
    """[B, N]: the softmax attention row of each sample's last token, averaged over heads."""
    batch, heads, _, dim = attention.q.shape
    kv_heads = attention.k.shape[1]
    q_last = attention.q[:, :, -1:].reshape(batch, kv_heads, heads // kv_heads, 1, dim)
    logits = grouped_logits(q_last, attention.k)[:, :, 0] * attention.scale
    logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)


class FastVPruner(RecordingReducer):
    def __init__(self, options: FastVOptions):
        super().__init__(options.prune_mode)
        self.options = options

    def wants_attention(self, layer: int) -> bool:
        return layer == self.options.layer - 1

    def after_layer(self, layer: int, state: TokenState, attention: LayerAttention | None) -> TokenState:
        if layer != self.options.layer - 1:
            return state
        scores = last_token_attention(attention, state.alive)
        wanted = [int(n * (1.0 - self.options.drop_ratio)) for n in state.live_visual]
        keep, kept = keep_top_visual(state, scores, wanted)
        return self.apply(layer, state, keep, kept)


class FastVPlan(PruningPlan):
    def __init__(self, options: FastVOptions, num_layers: int, name: str = "fastv"):
        check_layer(options.layer, num_layers, "layer")
        if options.layer < 1:
            raise ScheduleError("layer must be at least 1: the scores come from layer K - 1")
        self.name, self.options = name, options

    def visual_tokens_leaving(self, layer: int, num_visual: int) -> int:
        if layer < self.options.layer - 1:
            return num_visual
        return int(num_visual * (1.0 - self.options.drop_ratio))

    def layer_reducer(self, num_layers: int) -> FastVPruner:
        return FastVPruner(self.options)

    def text_free_layers(self, num_layers: int) -> int:
        """The layers before K - 1, whose last prompt token (the question's end) ranks the tokens."""
        return self.options.layer - 1
