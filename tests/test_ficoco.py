"""FiCoCo-L: filter / correlate / compress against loops written from docs/algorithms.md §7, and the
method inside the model (counts, cache, batches)."""

import pytest
import torch
from conftest import plan, prompt_ids, random_frames

from aim_llava.reduction.methods.ficoco import (
    compress_weights,
    correlation,
    filter_scores,
)
from aim_llava.reduction.plan import Merge, apply_merge

GEN = dict(max_new_tokens=6, eos_token_id=[])
CONFIG = {"method": "ficoco_l", "start_layer": 2, "end_layer": 3, "keep_ratio": 0.5}


@pytest.fixture
def attention_matrix():
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(12, 12, generator=gen).tril()
    return a / a.sum(dim=1, keepdim=True)


def test_filter_scores(attention_matrix):
    a = attention_matrix
    visual = torch.zeros(12, dtype=torch.bool)
    visual[3:9] = True
    text_after = torch.zeros(12, dtype=torch.bool)
    text_after[9:] = True
    ours = filter_scores(a, visual, text_after, beta=0.6)
    for i in range(3, 9):
        from_visual = sum(a[q, i] for q in range(3, 9)) / 6
        from_text = sum(a[t, i] for t in range(9, 12)) / 3
        assert ours[i] == pytest.approx(float(0.6 * from_visual - 0.4 * from_text), abs=1e-6)


def test_correlation(attention_matrix):
    a = attention_matrix
    sources, targets = torch.tensor([4, 7]), torch.tensor([3, 5, 6, 8])
    text = torch.zeros(12, dtype=torch.bool)
    text[[0, 1, 2, 9, 10, 11]] = True
    ours = correlation(a, sources, targets, text, gamma=0.6)
    for r, i in enumerate([4, 7]):
        for c, j in enumerate([3, 5, 6, 8]):
            via = sum(a[i, k] * a[k, j] for k in [0, 1, 2, 9, 10, 11]) / 6
            assert ours[r, c] == pytest.approx(float(0.6 * a[i, j] + 0.4 * via), abs=1e-6)


def test_row_quantile_equals_torch_quantile():
    from aim_llava.reduction.methods.ficoco import row_quantile

    values = torch.randn(4, 3, 37, generator=torch.Generator().manual_seed(9))
    for q in (0.0, 0.5, 0.998, 1.0):
        assert torch.allclose(row_quantile(values, q), torch.quantile(values, q, dim=-1, keepdim=True), atol=1e-6)


def test_compress_follows_the_equations():
    gen = torch.Generator().manual_seed(3)
    corr = torch.rand(3, 500, generator=gen)
    weights = compress_weights(corr, eps=0.998)
    for i in range(3):
        threshold = torch.quantile(corr[i], 0.998)
        chosen = [j for j in range(500) if corr[i, j] >= threshold]
        assert 1 <= len(chosen) <= 2  # "in practice 1-2 targets"
        total = sum(float(corr[i, j]) for j in chosen)
        for j in range(500):
            expected = float(corr[i, j]) / total if j in chosen else 0.0
            assert float(weights[i, j]) == pytest.approx(expected, abs=1e-6)
    hidden = torch.randn(510, 4, generator=gen)
    original = torch.arange(510)
    merged = hidden.clone()
    sources, targets = torch.tensor([500, 503, 507]), torch.arange(500)
    apply_merge(merged, original, Merge(sources, targets, weights), 510)
    for j in range(500):
        mix = hidden[j] + sum(weights[s, j] * hidden[500 + [0, 3, 7][s]] for s in range(3))
        assert torch.allclose(merged[j], mix / (1 + weights[:, j].sum()), atol=1e-6)


def test_counts_and_cache(loaded):
    tokenizer, model, processor, _ = loaded
    reduction = plan(model, CONFIG)
    video = processor.preprocess(random_frames(3, 64, 80, seed=4))["pixel_values"]
    ids = prompt_ids(tokenizer, "What is happening?")
    cached = model.generate(ids, images=[video], modalities=["video"], reduction=reduction,
                            return_dict_in_generate=True, **GEN)
    counts = [layer[0] for layer in cached.reduction.visual_tokens_per_layer]
    visual = 3 * 196 + 1
    target = int(visual * 0.5)
    assert counts == [visual] * 3 + [visual - (visual - target) // 2] + [target] * 2
    assert cached.reduction.merges  # information was folded, not only dropped
    recomputed = model.generate(ids, images=[video], modalities=["video"], use_cache=False, reduction=reduction, **GEN)
    assert torch.equal(cached.sequences, recomputed)


def test_vision_redundancy_and_local_penalty():
    from aim_llava.reduction.methods.ficoco import vision_redundancy, window_maxima
    from aim_llava.reduction.tokens import LayerAttention

    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 3, 16, 4, generator=gen), torch.randn(2, 3, 16, 4, generator=gen)
    scores, a = vision_redundancy(LayerAttention(q, k, 0.5), lam=0.35)
    for v in range(2):
        probs = torch.stack([torch.softmax(q[v, h] @ k[v, h].T * 0.5, dim=-1) for h in range(3)]).mean(dim=0)
        keys = k[v].transpose(0, 1).reshape(16, 12)
        mean_key = keys.mean(dim=0)
        for i in range(16):
            pays = sum(float(probs[i, j]) for j in range(16) if j != i) / 15
            semantic = -float(torch.nn.functional.cosine_similarity(mean_key, keys[i], dim=0))
            assert float(scores[v, i]) == pytest.approx(0.35 * pays - 0.65 * semantic, abs=1e-5)
    grid_scores = torch.randn(1, 25, generator=gen)  # a 5x5 grid: windows of 2x2, 2x1, 1x2, 1x1
    marked = window_maxima(grid_scores, torch.arange(25)[None], grid=5)
    for wr in range(3):
        for wc in range(3):
            members = [r * 5 + c for r in range(2 * wr, min(5, 2 * wr + 2)) for c in range(2 * wc, min(5, 2 * wc + 2))]
            best = max(members, key=lambda i: float(grid_scores[0, i]))
            assert [i for i in members if marked[0, i]] == [best]


def test_ficoco_v_tokens_and_anyres_refusal(loaded):
    from conftest import random_image

    from aim_llava.errors import InputError
    from aim_llava.mm_utils import process_images

    tokenizer, model, processor, _ = loaded
    reduction = plan(model, {"method": "ficoco_v", "vision_start_layer": 0, "vision_keep_ratio": 0.3})
    video = processor.preprocess(random_frames(2, 64, 80, seed=6))["pixel_values"]
    with torch.no_grad():
        out = model(prompt_ids(tokenizer, "Hi"), images=[video], modalities=["video"], reduction=reduction)
    per_frame = 729 - (729 - int(729 * 0.3)) // 2 * 2  # 2 tower layers, equal counts, no pooling
    assert out.reduction.visual_tokens_per_layer[0][0] == 2 * per_frame + 1
    image = random_image(900, 500)
    with pytest.raises(InputError, match="anyres"):
        model(prompt_ids(tokenizer, "Hi"), images=process_images([image], processor, model.config),
              image_sizes=[image.size], reduction=reduction)
