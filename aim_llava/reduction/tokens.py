"""The tokens in the LLM during prefill, and removing or masking some of them.

This is the interface between the decoder loop and the reduction methods: the decoder hands a
:class:`TokenState` to the method after each layer and continues with the one it gets back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

PRUNE_MODES = ("remove", "mask")


@dataclass
class LayerAttention:
    """What a layer's attention saw: rotated queries [B, H, N, d], keys [B, H_kv, N, d], scale."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float


@dataclass
class TokenState:
    """Per-sample token rows, left-padded.

    valid: real (not padding) rows. alive: rows that later tokens may attend to (valid, and not
    pruned in mask mode). visual: visual-token rows. original_index: the row's index in the
    prefill sequence, which is ``prefill_length`` long. num_visual: per-sample visual-token
    counts at the start of the prefill. visual_per_layer [layers, B]: visual tokens that entered each
    layer (filled in by the decoder at the end).
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    valid: torch.Tensor
    alive: torch.Tensor
    visual: torch.Tensor
    original_index: torch.Tensor
    padded: bool
    num_visual: list[int]
    prefill_length: int
    visual_per_layer: torch.Tensor | None = None

    @classmethod
    def start(cls, hidden, position_ids, valid, visual, padded: bool, count: bool = True) -> TokenState:
        """The state before the first layer; ``count=False`` (decoding steps) skips the per-sample
        counts, which need a device sync."""
        batch, n = valid.shape
        visual = torch.zeros_like(valid) if visual is None else visual & valid
        num_visual = visual.sum(dim=1).tolist() if count else []
        index = torch.arange(n, device=valid.device).expand(batch, n)
        return cls(hidden, position_ids, valid, valid, visual, index, padded, num_visual, n)

    def visual_alive_counts(self) -> torch.Tensor:
        return (self.visual & self.alive).sum(dim=1)


def keep_tokens(state: TokenState, keep: torch.Tensor, mode: str) -> TokenState:
    """Keep the rows where ``keep`` [B, N] is True (a subset of ``state.alive``).

    ``mask``: rows stay and are no longer attended to. ``remove``: rows are dropped; each
    sample's kept rows stay in order, right-aligned, with padding rows in front.
    """
    keep = keep & state.alive
    if mode == "mask":
        return dataclasses.replace(state, alive=keep, padded=True)
    counts = keep.sum(dim=1)
    count_list = counts.tolist()
    width = max(count_list)
    batch, n = keep.shape
    columns = torch.where(keep, width - counts[:, None] + keep.long().cumsum(dim=1) - 1, width)
    rows = torch.arange(n, device=keep.device).expand(batch, n)
    index = torch.zeros(batch, width + 1, dtype=torch.long, device=keep.device).scatter(1, columns, rows)[:, :width]
    valid = torch.zeros(batch, width + 1, dtype=torch.bool, device=keep.device).scatter(1, columns, keep)[:, :width]

    def take(values: torch.Tensor) -> torch.Tensor:
        if values.dim() == 3:
            return values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))
        return values.gather(1, index)

    return dataclasses.replace(
        state,
        hidden=take(state.hidden),
        position_ids=take(state.position_ids),
        valid=valid,
        alive=valid.clone(),
        visual=take(state.visual) & valid,
        original_index=take(state.original_index),
        padded=any(c != width for c in count_list),
    )


def keep_top_visual(state: TokenState, scores: torch.Tensor, visual_kept: list[int]) -> torch.Tensor:
    """Keep mask: every text token plus the ``visual_kept[b]`` best-scoring live visual tokens."""
    candidates = state.visual & state.alive
    ranked = torch.where(candidates, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    order = ranked.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    top = ranks < torch.tensor(visual_kept, device=ranks.device)[:, None]
    return (top & candidates) | (state.valid & ~state.visual)


class LayerReducer:
    """Acts after decoder layers during one prefill. The default keeps everything."""

    def wants_attention(self, layer: int) -> bool:
        return False

    def after_layer(self, layer: int, state: TokenState, attention: LayerAttention | None) -> TokenState:
        return state


class VisionReducer:
    """Acts after vision-tower layers during one encoding; the default keeps every patch."""

    def wants_attention(self, layer: int) -> bool:
        return False

    def after_layer(self, layer: int, hidden: torch.Tensor, attention: LayerAttention | None) -> torch.Tensor:
        """Patch features [views, N, C] -> [views, N', C]."""
        return hidden
