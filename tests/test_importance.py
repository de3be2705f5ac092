"""Chunked PageRank importance against the dense formula of docs/algorithms.md §3."""

import pytest
import torch

from aim_llava.reduction.importance import pagerank_importance, pagerank_importance_flex


def dense_importance(q, k, key_mask, start, scale, temperature=0.1, iterations=5):
    """The formula as written, with the whole [B, H, N, N] matrix."""
    heads, kv_heads, n = q.shape[1], k.shape[1], q.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=1).double()
    logits = (q.double() @ k.transpose(-1, -2)) * scale
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))[None] & key_mask[:, None, :]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1).nan_to_num(0.0)  # rows that see nothing: 0
    p = start.double()[:, None, :].expand(-1, heads, -1)
    for _ in range(iterations):
        p = (p[:, :, None, :] @ probs).squeeze(2)
    return p.pow(2).mean(dim=1).sqrt()


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, n, dim = 2, 4, 2, 37, 8
    q = torch.randn(batch, heads, n, dim, generator=gen)
    k = torch.randn(batch, kv_heads, n, dim, generator=gen)
    key_mask = torch.ones(batch, n, dtype=torch.bool)
    key_mask[0, :5] = False  # left padding of sample 0
    key_mask[1, 10:14] = False  # tokens pruned earlier (mask mode)
    start = key_mask.float() / key_mask.sum(dim=1, keepdim=True)
    return q, k, key_mask, start


@pytest.mark.parametrize("cache_budget", [0, 2**30])  # recompute the chunks every step / keep them
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, None])
def test_chunked_equals_dense(inputs, chunk_size, cache_budget):
    q, k, key_mask, start = inputs
    ours = pagerank_importance(q, k, key_mask, start, scale=8**-0.5, chunk_size=chunk_size, cache_budget=cache_budget)
    reference = dense_importance(q, k, key_mask, start, scale=8**-0.5)
    assert ours.shape == (2, 37) and ours.dtype == torch.float32
    assert torch.allclose(ours.double(), reference, atol=1e-5, rtol=0)


def test_memory_budget_chooses_small_chunks(inputs):
    q, k, key_mask, start = inputs
    tiny_budget = pagerank_importance(q, k, key_mask, start, scale=0.35, memory_budget=2 * 4 * 37 * 4 * 3,
                                      cache_budget=0)
    assert torch.allclose(tiny_budget, pagerank_importance(q, k, key_mask, start, scale=0.35), atol=1e-6)


def test_settings_change_the_result(inputs):
    q, k, key_mask, start = inputs
    base = pagerank_importance(q, k, key_mask, start, scale=0.35)
    assert not torch.allclose(base, pagerank_importance(q, k, key_mask, start, scale=0.35, temperature=1.0))
    assert not torch.allclose(base, pagerank_importance(q, k, key_mask, start, scale=0.35, iterations=2))


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")  # on CPU it runs its dense reference path
def test_flex_kernel_equals_dense(inputs):
    q, k, key_mask, start = inputs
    ours = pagerank_importance_flex(q, k, key_mask, start, scale=8**-0.5)
    reference = dense_importance(q, k, key_mask, start, scale=8**-0.5)
    assert torch.allclose(ours.double(), reference, atol=1e-5, rtol=0)
