"""The tokens in the LLM during prefill, and removing or masking some of them.

This is the interface between the decoder loop and the reduction methods: the decoder hands a
:class:`TokenState` to the method after each layer and continues with the one it gets back.

Every count that decides a shape (rows per sample, visual tokens still alive) is kept on the
host, next to the device tensors, and updated from the decisions themselves (a method keeps
exactly the number of visual tokens it asks for). So a prefill never reads a value back from the
device: no host-device synchronisation stalls the GPU's queue between layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from aim_llava.tensors import host_values

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

    ``hidden`` [B, N, H]; ``position_ids`` [B, N], or [B, N, 3] (time, height, width: multimodal
    RoPE), a row's positions travelling with it when rows are removed. Device tensors [B, N]:
    ``valid`` real (not padding) rows; ``alive`` rows that later tokens may
    attend to (valid, and not pruned in mask mode); ``visual`` visual-token rows;
    ``original_index`` the row's index in the prefill sequence (``prefill_length`` long).
    Host counts per sample: ``num_visual`` visual tokens at the start of the prefill, ``rows``
    valid rows now, ``live_visual`` visual tokens still alive now. ``nonfinite_scores`` [B]
    (device, shared by every state of one prefill): samples for which a reduction method's token
    scores held a NaN or +inf (:func:`keep_top_visual`); decoding ends them with an error.
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    valid: torch.Tensor
    alive: torch.Tensor
    visual: torch.Tensor
    original_index: torch.Tensor
    padded: bool
    num_visual: list[int]
    rows: list[int]
    live_visual: list[int]
    prefill_length: int
    nonfinite_scores: torch.Tensor | None = None

    @classmethod
    def start(cls, hidden, position_ids, valid, visual, padded: bool, num_visual: list[int] | None = None,
              rows: list[int] | None = None) -> TokenState:
        """The state before the first layer. ``num_visual`` and ``rows`` are the host's counts of
        visual tokens and real rows per sample (None: none visual / every row real)."""
        batch, n = valid.shape
        visual = torch.zeros_like(valid) if visual is None else visual & valid
        num_visual = list(num_visual) if num_visual is not None else [0] * batch
        rows = list(rows) if rows is not None else [n] * batch
        index = torch.arange(n, device=valid.device).expand(batch, n)
        return cls(hidden, position_ids, valid, valid, visual, index, padded, num_visual, rows, list(num_visual), n,
                   torch.zeros(batch, dtype=torch.bool, device=valid.device))


def keep_tokens(state: TokenState, keep: torch.Tensor, mode: str, visual_kept: list[int]) -> TokenState:
    """Keep the rows where ``keep`` [B, N] is True: every live text row and exactly
    ``visual_kept[b]`` live visual rows of sample b (the caller's decision, so the new shape is
    known on the host).

    ``mask``: rows stay and are no longer attended to. ``remove``: rows are dropped; each
    sample's kept rows stay in order, right-aligned, with padding rows in front.
    """
    keep = keep & state.alive
    if mode == "mask":
        return dataclasses.replace(state, alive=keep, padded=True, live_visual=list(visual_kept))
    counts_host = [rows - live + kept for rows, live, kept in zip(state.rows, state.live_visual, visual_kept)]
    width = max(counts_host)
    batch, n = keep.shape
    counts = keep.sum(dim=1, keepdim=True)
    columns = torch.where(keep, width - counts + keep.long().cumsum(dim=1) - 1, width)
    source_rows = torch.arange(n, device=keep.device).expand(batch, n)
    index = torch.zeros(batch, width + 1, dtype=torch.long, device=keep.device).scatter(1, columns, source_rows)[:, :width]
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
        padded=any(c != width for c in counts_host),
        rows=counts_host,
        live_visual=list(visual_kept),
    )


def keep_top_visual(state: TokenState, scores: torch.Tensor, visual_kept: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Keep mask of every live text token plus the best-scoring live visual tokens of each sample,
    ``min(visual_kept[b], live)`` of them; returns the mask and those counts.

    Ties are broken by position: of equal scores the earlier token ranks higher (a stable sort).
    A NaN or -inf score ranks below every finite one, but above tokens that are not candidates. A
    candidate's NaN or +inf score (an overflow: the scores say nothing then) also flags its sample
    in ``state.nonfinite_scores``, on the device, for decoding to end it with an error.
    """
    candidates = state.visual & state.alive
    if state.nonfinite_scores is not None:
        state.nonfinite_scores |= ((scores.isnan() | scores.isposinf()) & candidates).any(dim=-1)
    lowest = torch.finfo(torch.float32).min
    ranked = torch.nan_to_num(scores.float(), nan=lowest, neginf=lowest, posinf=torch.finfo(torch.float32).max)
    ranked = torch.where(candidates, ranked, torch.full_like(ranked, float("-inf")))
    order = ranked.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    kept = [min(count, live) for count, live in zip(visual_kept, state.live_visual)]
    if len(set(kept)) == 1:
        top = ranks < kept[0]
    else:
        top = ranks < host_values(kept, ranks.device)[:, None]
    return (top & candidates) | (state.alive & ~state.visual), kept


def mask_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the True entries of ``mask`` [..., N] in increasing order, when each row holds
    exactly ``count`` of them (known to the caller, so no synchronisation): [..., count]."""
    n = mask.shape[-1]
    index = torch.arange(n, device=mask.device)
    return torch.where(mask, index, index + n).sort(dim=-1).values[..., :count]


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

    def patch_assignment(self) -> torch.Tensor | None:
        """After a pass: [views, patches], the output patch each input patch went into (-1: none);
        None when every patch stayed as it was."""
        return None
