"""Bipartite similarity merging of visual tokens (AIM before the LLM; ToMe-style matching).

One step (docs/algorithms.md §2), for tokens ``x`` [G, T, C] merged within each group (a frame):
sources are the even positions, targets the odd ones; every source finds its most cosine-similar
target; the ``r`` sources with the highest best-scores are merged into their targets as a plain
mean with the target (``scatter_reduce(mean, include_self=True)``); the output is the unmerged
sources (in descending-score order) followed by all targets (in order). Ties are broken by
position (a stable sort; a source's best target is its first most similar one), so that every
process that merges the same tokens (each tensor-parallel rank of vLLM) merges them alike.

Options beyond the published behaviour: ``order="spatial"`` returns tokens sorted by their
original position, and ``weighting="size"`` averages by how many original tokens each one holds.
A state started with ``track=True`` also follows which token each original token went into
(``MergeState.origin``), for a picture of what was merged; merging without it does no more work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ORDERS = ("published", "spatial")
WEIGHTINGS = ("mean", "size")


@dataclass
class MergeState:
    """Tokens with, per token, its representative original position and how many it holds; when
    tracked, ``origin`` [G, T0] gives the token each original token went into."""

    tokens: torch.Tensor  # [G, T, C]
    positions: torch.Tensor  # [G, T] long
    sizes: torch.Tensor  # [G, T] float
    origin: torch.Tensor | None = None  # [G, T0] long

    @classmethod
    def start(cls, tokens: torch.Tensor, track: bool = False) -> MergeState:
        groups, count, _ = tokens.shape
        positions = torch.arange(count, device=tokens.device).expand(groups, count)
        return cls(tokens, positions, torch.ones(groups, count, device=tokens.device, dtype=torch.float32),
                   positions if track else None)


def step_assignment(kept_src: torch.Tensor, merged_src: torch.Tensor, targets_of_merged: torch.Tensor,
                    count: int) -> torch.Tensor:
    """[G, count]: the output index of each input token of one published-order step (kept sources
    first, then the targets, merged sources in their targets)."""
    groups, kept = kept_src.shape
    sources = torch.empty(groups, (count + 1) // 2, dtype=torch.long, device=kept_src.device)
    sources.scatter_(1, kept_src, torch.arange(kept, device=kept_src.device).expand(groups, kept))
    sources.scatter_(1, merged_src, kept + targets_of_merged)
    assignment = torch.empty(groups, count, dtype=torch.long, device=kept_src.device)
    assignment[:, ::2] = sources
    assignment[:, 1::2] = kept + torch.arange(count // 2, device=kept_src.device)
    return assignment


def merge_bipartite(state: MergeState, r: int, order: str = "published", weighting: str = "mean") -> MergeState:
    """One merging step removing ``min(r, T // 2)`` tokens per group."""
    tokens = state.tokens
    r = min(r, tokens.shape[1] // 2)
    if r <= 0:
        return state
    normed = F.normalize(tokens.float(), dim=-1)
    scores = normed[:, ::2] @ normed[:, 1::2].transpose(1, 2)
    best_score, best_target = scores.max(dim=-1)
    ranking = best_score.argsort(dim=-1, descending=True, stable=True)
    merged_src, kept_src = ranking[:, :r], ranking[:, r:]
    targets_of_merged = best_target.gather(1, merged_src)

    def pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if values.dim() == 3:
            return values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))
        return values.gather(1, index)

    src_tokens, dst_tokens = tokens[:, ::2], tokens[:, 1::2]
    src_sizes, dst_sizes = state.sizes[:, ::2], state.sizes[:, 1::2]
    scatter_index = targets_of_merged[..., None].expand(-1, -1, tokens.shape[-1])
    # accumulated in float32 at least: CUDA's scatter reductions add in arbitrary order (atomics),
    # which in bfloat16 changes results from call to call
    work = torch.promote_types(tokens.dtype, torch.float32)
    if weighting == "mean":
        merged = dst_tokens.to(work).scatter_reduce(1, scatter_index, pick(src_tokens, merged_src).to(work),
                                                    reduce="mean", include_self=True).to(tokens.dtype)
    else:
        weighted = (dst_tokens.to(work) * dst_sizes[..., None]).scatter_add(
            1, scatter_index, pick(src_tokens, merged_src).to(work) * pick(src_sizes, merged_src)[..., None]
        )
        total = dst_sizes.scatter_add(1, targets_of_merged, pick(src_sizes, merged_src))
        merged = (weighted / total[..., None]).to(tokens.dtype)
    sizes = torch.cat([pick(src_sizes, kept_src), dst_sizes.scatter_add(1, targets_of_merged, pick(src_sizes, merged_src))], 1)
    assignment = None
    if state.origin is not None:
        assignment = step_assignment(kept_src, merged_src, targets_of_merged, tokens.shape[1])
    result = MergeState(
        torch.cat([pick(src_tokens, kept_src), merged], dim=1),
        torch.cat([pick(state.positions[:, ::2], kept_src), state.positions[:, 1::2]], dim=1),
        sizes,
    )
    if order == "spatial":
        by_position = result.positions.argsort(dim=-1)
        result = MergeState(pick(result.tokens, by_position), pick(result.positions, by_position),
                            pick(result.sizes, by_position))
        if assignment is not None:
            assignment = by_position.argsort(dim=-1).gather(1, assignment)
    if assignment is not None:
        result.origin = assignment.gather(1, state.origin)
    return result


def merge_steps_for_ratio(num_tokens: int, ratio: float) -> list[int]:
    """Per-step counts keeping about ``ratio`` of ``num_tokens``.

    Halving steps ``r = T0 // 2, T0 // 4, ...`` as published (25%: 196 -> 98 -> 49), while the
    result stays at or above the target ``ceil(T0 * ratio)``; then one partial step down to the
    target. So 50%, 25%, 12.5%, 6%... give the published counts (12.5% of 196 is 25) and other
    ratios (37.5%: 196 -> 98 -> 74) stop at the target.
    """
    target = math.ceil(num_tokens * ratio - 1e-9)
    steps, current, k = [], num_tokens, 1
    while True:
        r = min(num_tokens // 2**k, current // 2)
        if r <= 0 or current - r < target:
            break
        steps.append(r)
        current -= r
        k += 1
    if current > target:
        steps.append(min(current - target, current // 2))
    return steps


def tokens_after_steps(num_tokens: int, steps: list[int]) -> int:
    """How many of ``num_tokens`` are left after ``steps``, each merging ``min(r, T // 2)`` of the
    current T (as :func:`merge_bipartite` does): ``[150]`` leaves 98 of 196, not 46."""
    for r in steps:
        num_tokens -= max(0, min(r, num_tokens // 2))
    return num_tokens


def merge_state(tokens: torch.Tensor, steps: list[int], order: str = "published", weighting: str = "mean",
                track: bool = False) -> MergeState:
    """Apply merging steps to [G, T, C] tokens; the result holds tokens_after_steps(T, steps) tokens
    a group and, for each, the original position it keeps (a merged token keeps its destination's);
    with ``track``, also where each original token went (``origin``)."""
    state = MergeState.start(tokens, track)
    for r in steps:
        state = merge_bipartite(state, r, order, weighting)
    return state


def merge_tokens(
    tokens: torch.Tensor, steps: list[int], order: str = "published", weighting: str = "mean"
) -> torch.Tensor:
    """Apply merging steps to [G, T, C] tokens; returns [G, tokens_after_steps(T, steps), C]."""
    return merge_state(tokens, steps, order, weighting).tokens
