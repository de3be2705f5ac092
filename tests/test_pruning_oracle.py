"""Which tokens AIM, FitPrune and FiCoCo-L keep inside the model, against float64 references written
here from docs/algorithms.md §3, §6 and §7.

The references read only the un-rotated query and key projections of each pruning layer (forward
hooks on ``q_proj`` / ``k_proj`` during a real prefill), rotate them at the positions the tokens
must have, and compute the scores with dense float64 formulas: none of the package's kernels,
masks or selection code is used. Each prompt is checked to separate the scores at the cut by a
clear margin, so a float32 rounding cannot decide which token stays.
"""

import json
from functools import partial

import pytest
import torch
from conftest import plan, prompt_ids, random_frames

from aim_llava.constants import IMAGE_TOKEN_INDEX

FRAME_TOKENS = 196  # pooled tokens a frame (docs/algorithms.md §1)
MERGED_FRAME_TOKENS = 49  # after AIM's two halving merge steps
# Least relative gap between the last kept and the first dropped score. AIM's float32 importance
# is within about 3e-5 (relative) of the float64 one on these prompts (its temperature of 0.1
# magnifies rounding); the attention probabilities FitPrune and FiCoCo read, within about 1e-6.
AIM_MARGIN = 1e-3
ATTENTION_MARGIN = 1e-4


class ProjectionTap:
    """Forward hooks on ``q_proj`` and ``k_proj`` of chosen decoder layers; keeps, per layer, the
    output of the first call (the prefill) in float64: [N, heads * head_dim] of sample 0."""

    def __init__(self, model, layers):
        self.q, self.k = {}, {}
        self.handles = []
        for layer in layers:
            attention = model.model.layers[layer].self_attn
            self.handles.append(attention.q_proj.register_forward_hook(partial(self.keep, self.q, layer)))
            self.handles.append(attention.k_proj.register_forward_hook(partial(self.keep, self.k, layer)))

    @staticmethod
    def keep(store, layer, module, args, output):
        store.setdefault(layer, output[0].detach().double())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def rotated_heads(projection, positions, head_dim, theta):
    """[heads, N, d]: the projection split into heads with rotary embeddings at ``positions``."""
    n = projection.shape[0]
    x = projection.view(n, -1, head_dim).transpose(0, 1)
    inverse = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * inverse[None]
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def attention_logits(tap, model, layer, positions):
    """[heads, N, N] q k^T / sqrt(d) of the rows present at ``layer``, rotated at their original
    ``positions`` (grouped key heads shared by their query heads)."""
    text = model.config.text
    q = rotated_heads(tap.q[layer], positions, text.head_dim, text.rope_theta)
    k = rotated_heads(tap.k[layer], positions, text.head_dim, text.rope_theta)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    return q @ k.transpose(-1, -2) / text.head_dim**0.5


def softmax(logits, keys, temperature=1.0):
    """Attention probabilities over keys: causal, only the keys marked in ``keys`` [N]."""
    n = logits.shape[-1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & keys[None, :]
    return torch.softmax((logits / temperature).masked_fill(~allowed, float("-inf")), dim=-1)


def rows_at(layer_alive, mode):
    """(present, positions): the rows a layer sees (remove: the live ones; mask: all) and their
    original positions."""
    n = layer_alive.shape[0]
    present = layer_alive if mode == "remove" else torch.ones(n, dtype=torch.bool)
    return present, present.nonzero().flatten()


def visual_span(ids, prefill_length):
    """[prefill_length] mask of the visual rows: the placeholder's place, expanded."""
    ids = ids[0].tolist()
    start = ids.index(IMAGE_TOKEN_INDEX)
    visual = torch.zeros(prefill_length, dtype=torch.bool)
    visual[start : start + prefill_length - (len(ids) - 1)] = True
    return visual


def tapped_prefill(model, ids, video, reduction, layers, n_visual):
    """A prefill with the projections of ``layers`` tapped: (output, tap, visual mask); checks the
    visual count and that tokens were dropped after exactly ``layers``."""
    with ProjectionTap(model, layers) as tap, torch.no_grad():
        out = model(ids, images=[video], modalities=["video"], reduction=reduction)
    visual = visual_span(ids, out.inputs.valid.shape[1])
    assert int(visual.sum()) == n_visual and sorted(out.reduction.kept) == layers
    return out, tap, visual


def cut(scores, candidates, count, margin):
    """Mask of the ``count`` highest ``scores`` among ``candidates``; fails unless the cut
    separates them from the next one by ``margin`` (relative)."""
    ranked = torch.where(candidates, scores, torch.full_like(scores, float("-inf")))
    order = ranked.argsort(descending=True)
    if 0 < count < int(candidates.sum()):
        last, first_out = float(ranked[order[count - 1]]), float(ranked[order[count]])
        assert last - first_out > margin * abs(last), (
            f"the prompt does not separate the scores at the cut ({last!r} vs {first_out!r}): choose another one")
    return torch.zeros_like(candidates).scatter(0, order[:count], True) if count > 0 else torch.zeros_like(candidates)


# AIM (docs/algorithms.md §3) ------------------------------------------------------------------


def published_retention(layer, start=3, step=0.125):
    """r[l] of the published schedule; 6 layers start at 3 (14 of 28)."""
    return 1.0 if layer < start else max(0.0, 1.0 - (layer - start + 1) * step)


def aim_importance(logits, keys, temperature=0.1, iterations=5):
    """sqrt(mean over heads of p^2), p_0 uniform over the rows present, p <- p M five times."""
    m = softmax(logits, keys, temperature)
    p = torch.full((m.shape[0], m.shape[1]), 1.0 / m.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        p = (p[:, None, :] @ m).squeeze(1)
    return p.pow(2).mean(dim=0).sqrt()


@pytest.fixture(scope="module")
def video_question(loaded):
    tokenizer, _, processor, _ = loaded
    video = processor.preprocess(random_frames(4, 64, 80, seed=3))["pixel_values"]
    return prompt_ids(tokenizer, "Describe the video in detail."), video


@pytest.mark.parametrize("preset, mode", [("aim_default", "remove"), ("aim_default_mask", "mask")])
def test_aim_keeps_the_top_tokens_of_the_reference_importance(loaded, video_question, preset, mode):
    _, model, _, _ = loaded
    ids, video = video_question
    n_visual, layers = 4 * MERGED_FRAME_TOKENS + 1, [3, 4, 5]
    out, tap, visual = tapped_prefill(model, ids, video, plan(model, preset), layers, n_visual)
    n = visual.shape[0]
    alive = torch.ones(n, dtype=torch.bool)
    for layer in layers:
        # mask mode: pruned rows are still queries with a start weight, but no longer keys
        present, positions = rows_at(alive, mode)
        scores = torch.zeros(n, dtype=torch.float64)
        scores[positions] = aim_importance(attention_logits(tap, model, layer, positions), alive[present])
        scores[~alive] = -1.0  # pruned: -1
        scores[~visual] = 1.0  # text: 1
        n_text = n - n_visual
        keep = cut(scores, torch.ones(n, dtype=torch.bool), int((n - n_text) * published_retention(layer)) + n_text,
                   AIM_MARGIN)
        assert torch.equal(out.reduction.kept[layer][0], keep), f"layer {layer}"
        alive = keep


# FitPrune (docs/algorithms.md §6) ---------------------------------------------------------------

RECIPE_DROP = [0, 120, 0, 90, 60, 0]  # visual tokens dropped after each layer


def fitprune_scores(probabilities, present_alive, present_visual, first_visual_row):
    """c_j * v_j over the rows present: attention (max over heads) each token receives from the
    live text queries after the first visual token, and from the live visual queries."""
    received = probabilities.amax(dim=0)
    rows = torch.arange(received.shape[0])
    text_queries = present_alive & ~present_visual & (rows > first_visual_row)
    visual_queries = present_alive & present_visual
    c = received[text_queries].sum(dim=0)
    v = received[visual_queries].sum(dim=0)
    return c * v


@pytest.mark.parametrize("mode", ["remove", "mask"])
def test_fitprune_drops_the_lowest_reference_scores(loaded, tmp_path, mode):
    tokenizer, model, processor, _ = loaded
    video = processor.preprocess(random_frames(2, 64, 80, seed=6))["pixel_values"]
    ids = prompt_ids(tokenizer, "What is happening in this clip?")
    n_visual = 2 * FRAME_TOKENS + 1
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"drop": RECIPE_DROP, "visual_tokens": n_visual}))
    layers = [layer for layer, drop in enumerate(RECIPE_DROP) if drop]
    reduction = plan(model, {"method": "fitprune", "recipe": str(recipe), "prune_mode": mode})
    out, tap, visual = tapped_prefill(model, ids, video, reduction, layers, n_visual)
    n = visual.shape[0]
    alive = torch.ones(n, dtype=torch.bool)
    for layer in layers:
        present, positions = rows_at(alive, mode)
        probabilities = softmax(attention_logits(tap, model, layer, positions), alive[present])
        first_visual_row = int(visual[present].nonzero()[0])
        scores = torch.zeros(n, dtype=torch.float64)
        scores[positions] = fitprune_scores(probabilities, alive[present], visual[present], first_visual_row)
        live_visual = alive & visual
        kept_visual = cut(scores, live_visual, int(live_visual.sum()) - RECIPE_DROP[layer], ATTENTION_MARGIN)
        keep = kept_visual | (alive & ~visual)
        assert torch.equal(out.reduction.kept[layer][0], keep), f"layer {layer}"
        alive = keep


# FiCoCo-L (docs/algorithms.md §7) ---------------------------------------------------------------

FICOCO = {"method": "ficoco_l", "start_layer": 2, "end_layer": 3, "keep_ratio": 0.5}
BETA = GAMMA = 0.6
EPS = 0.998


def ficoco_kept_after(layer, n_visual, start=2, end=3, keep_ratio=0.5):
    """Visual tokens left after ``layer``: the removals spread evenly over the layers start..end."""
    if layer < start:
        return n_visual
    steps, done = end - start + 1, min(layer - start + 1, end - start + 1)
    return n_visual - (n_visual - int(n_visual * keep_ratio)) * done // steps


@pytest.mark.parametrize("mode", ["remove", "mask"])
def test_ficoco_removes_and_merges_as_the_reference(loaded, mode):
    tokenizer, model, processor, _ = loaded
    video = processor.preprocess(random_frames(3, 64, 80, seed=4))["pixel_values"]
    ids = prompt_ids(tokenizer, "What is happening?")
    n_visual = 3 * FRAME_TOKENS + 1
    layers = [2, 3]
    out, tap, visual = tapped_prefill(model, ids, video, plan(model, dict(FICOCO, prune_mode=mode)), layers, n_visual)
    n = visual.shape[0]
    alive = torch.ones(n, dtype=torch.bool)
    for layer in layers:
        present, positions = rows_at(alive, mode)
        a = softmax(attention_logits(tap, model, layer, positions), alive[present]).mean(dim=0)
        live_visual, text = (alive & visual)[present], (alive & ~visual)[present]
        later_text = text & (live_visual.cumsum(dim=0) > 0)
        redundancy = BETA * a[live_visual].mean(dim=0) - (1 - BETA) * a[later_text].mean(dim=0)
        count = int(live_visual.sum()) - ficoco_kept_after(layer, n_visual)
        removed = cut(redundancy, live_visual, count, ATTENTION_MARGIN)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[positions] = alive[present] & ~removed
        assert torch.equal(out.reduction.kept[layer][0], keep), f"layer {layer}"

        sources, targets = removed.nonzero().flatten(), (live_visual & ~removed).nonzero().flatten()
        via_text = a[sources][:, text] @ a[text][:, targets] / int(text.sum())
        correlation = GAMMA * a[sources][:, targets] + (1 - GAMMA) * via_text
        best, runner_up = correlation.topk(2, dim=1).values.unbind(dim=1)
        assert not ((best > 0) & (best - runner_up <= ATTENTION_MARGIN * best)).any(), (
            "the prompt leaves a removed token two equally correlated targets: choose another one")
        chosen = correlation >= torch.quantile(correlation, EPS, dim=1, keepdim=True)
        weights = torch.where(chosen, correlation, torch.zeros_like(correlation))
        total = weights.sum(dim=1, keepdim=True)
        # a token correlated with no kept one (every kept token comes after it) is folded nowhere
        weights = torch.where(total > 0, weights / total, torch.zeros_like(weights))
        merge = out.reduction.merges[(layer, 0)]
        assert torch.equal(merge.sources, positions[sources]) and torch.equal(merge.targets, positions[targets])
        assert torch.allclose(merge.weights.double(), weights, atol=1e-5), f"layer {layer}"
        alive = keep
