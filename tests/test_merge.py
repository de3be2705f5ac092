"""AIM merging against a straightforward, loop-based implementation of docs/algorithms.md §2."""

import pytest
import torch

from aim_llava.reduction.merge import (
    MergeState,
    merge_bipartite,
    merge_steps_for_ratio,
    merge_tokens,
)


def reference_step(tokens: list[torch.Tensor], positions: list[int], r: int):
    """One merging step for ONE frame, written from the words of docs/algorithms.md with Python lists."""
    r = min(r, len(tokens) // 2)
    if r <= 0:
        return tokens, positions
    sources = list(range(0, len(tokens), 2))
    targets = list(range(1, len(tokens), 2))
    best = []
    for s in sources:
        sims = [torch.nn.functional.cosine_similarity(tokens[s].double(), tokens[t].double(), dim=0).item()
                for t in targets]
        j = max(range(len(targets)), key=lambda i: sims[i])
        best.append((sims[j], s, j))
    ordered = sorted(best, key=lambda item: -item[0])
    merged_into = {j: [] for j in range(len(targets))}
    for _, s, j in ordered[:r]:
        merged_into[j].append(s)
    unmerged = [(tokens[s], positions[s]) for _, s, _ in ordered[r:]]
    new_targets = []
    for j, t in enumerate(targets):
        group = [tokens[t]] + [tokens[s] for s in merged_into[j]]
        new_targets.append((torch.stack(group).mean(dim=0), positions[t]))
    out = unmerged + new_targets
    return [x for x, _ in out], [p for _, p in out]


def reference_merge(frames: torch.Tensor, steps: list[int]) -> torch.Tensor:
    result = []
    for frame in frames:
        tokens, positions = list(frame), list(range(frame.shape[0]))
        for r in steps:
            tokens, positions = reference_step(tokens, positions, r)
        result.append(torch.stack(tokens))
    return torch.stack(result)


def test_half_precision_merges_accumulate_in_float32():
    """Merged bfloat16 tokens are float32 means rounded once (CUDA's atomic scatter would add in
    bfloat16 in arbitrary order, so two runs could differ): the reductions run in float32, and
    every merged token is the float64 mean of its group rounded to bfloat16, within one rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ReductionDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith(("scatter_reduce", "scatter_add")):
                self.dtypes.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(5)
    frames = (torch.randn(2, 64, 16, generator=gen) * 4).to(torch.bfloat16)
    with ReductionDtypes() as seen:
        ours = merge_bipartite(MergeState.start(frames), 24).tokens
    assert seen.dtypes == {torch.float32}
    for frame, merged in zip(frames, ours):
        tokens, _ = reference_step(list(frame.double()), list(range(64)), 24)
        reference = torch.stack(tokens)
        assert ((merged.double() - reference).abs() <= 2**-8 * reference.abs() + 1e-6).all()  # one bf16 rounding


@pytest.mark.parametrize(
    "ratio, steps, kept",
    [(0.5, [98], 98), (0.25, [98, 49], 49), (0.125, [98, 49, 24], 25), (0.375, [98, 24], 74)],
)
def test_merge_equals_reference(ratio, steps, kept):
    assert merge_steps_for_ratio(196, ratio) == steps
    frames = torch.randn(3, 196, 16, generator=torch.Generator().manual_seed(int(ratio * 1000)))
    ours = merge_tokens(frames, steps)
    reference = reference_merge(frames, steps)
    assert ours.shape == (3, kept, 16)
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0)


def test_full_halving_keeps_spatial_order():
    # 196 -> 98 -> 49 merges every source, so the survivors are the targets in their original order
    frames = torch.randn(2, 196, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(merge_tokens(frames, [98, 49]), merge_tokens(frames, [98, 49], order="spatial"))
    state = MergeState.start(frames)
    for r in (98, 49):
        state = merge_bipartite(state, r)
    assert state.positions[0].tolist() == list(range(3, 196, 4))


def test_spatial_order():
    frames = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(3))
    published = merge_tokens(frames, [10])
    spatial = merge_tokens(frames, [10], order="spatial")
    assert torch.allclose(published.sum(dim=1), spatial.sum(dim=1), atol=1e-5)  # same tokens
    assert not torch.allclose(published, spatial)  # in another order


@pytest.mark.parametrize("weighting, conserves", [("size", True), ("mean", False)])
def test_size_weighting_conserves_the_original_mass(weighting, conserves):
    frames = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    state = MergeState.start(frames)
    for r in (25, 12, 6):
        state = merge_bipartite(state, r, weighting=weighting)
    assert state.tokens.shape == (2, 7, 8)
    assert torch.equal(state.sizes.sum(dim=1), torch.full((2,), 50.0, dtype=state.sizes.dtype))
    mass = (state.sizes[..., None].double() * state.tokens).sum(dim=1)
    assert torch.allclose(mass, frames.sum(dim=1), atol=1e-9) == conserves


def test_steps_for_other_published_ratios():
    assert merge_steps_for_ratio(196, 0.0625) == [98, 49, 24, 12]
    assert sum(merge_steps_for_ratio(196, 0.03125)) == 196 - 7
    assert merge_steps_for_ratio(196, 1.0) == []


def test_ties_are_broken_by_position():
    """Sources with equal best scores merge in position order and a source ties to its first most
    similar target (as the reference's stable sort and first maximum do), so every process merges
    the same tokens. Each token is an axis direction times a random magnitude: their cosine
    similarities are exactly 1, 0 or -1 (many ties), while their values differ."""
    gen = torch.Generator().manual_seed(0)
    axes = torch.randint(0, 4, (2, 196), generator=gen)
    signs = torch.randint(0, 2, (2, 196, 1), generator=gen) * 2.0 - 1.0
    frames = torch.nn.functional.one_hot(axes, 4).float() * signs * (torch.rand(2, 196, 1, generator=gen) + 0.5)
    for steps in ([30], [98, 20]):
        assert torch.allclose(merge_tokens(frames, steps), reference_merge(frames, steps), atol=1e-6, rtol=0)
