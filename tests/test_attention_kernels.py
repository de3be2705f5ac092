"""Attention kernels against a direct float64 computation, for the call shapes the model makes:
grouped key/value heads, padding masks, and single-query decoding steps (which ``attend`` folds
into an ungrouped call)."""

import pytest
import torch

from aim_llava.model.attention import attend


def reference_attention(q, k, v, mask, causal):
    """softmax(q k^T * scale) v per query head in float64, head h reading kv head h // groups."""
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    out = torch.empty(batch, heads, q_len, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = q[b, h].double() @ k[b, kv].double().T * dim**-0.5
            allowed = torch.ones(q_len, k_len, dtype=torch.bool)
            if mask is not None:
                allowed &= mask[b, 0].expand(q_len, k_len)
            elif causal and q_len > 1:
                allowed &= torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[b, h] = torch.softmax(scores, dim=-1) @ v[b, kv].double()
    return out


def random_qkv(batch, heads, kv_heads, q_len, k_len, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, dim, generator=gen),
            torch.randn(batch, kv_heads, k_len, dim, generator=gen),
            torch.randn(batch, kv_heads, k_len, dim, generator=gen))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (8, 1)])
def test_decoding_step_over_a_masked_cache(implementation, heads, kv_heads):
    q, k, v = random_qkv(3, heads, kv_heads, 1, 37)
    valid = torch.rand(3, 37, generator=torch.Generator().manual_seed(1)) > 0.3
    valid[:, -1] = True  # the step's own slot
    mask = valid[:, None, None, :]
    out = attend(q, k, v, mask, False, q.shape[-1] ** -0.5, implementation)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask, False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_single_query_without_mask_sees_every_key(implementation):
    q, k, v = random_qkv(2, 6, 3, 1, 11)
    out = attend(q, k, v, None, True, q.shape[-1] ** -0.5, implementation)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, None, False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_prefill(implementation, masked):
    q, k, v = random_qkv(2, 6, 2, 13, 13)
    mask = None
    if masked:  # left padding: sample 1's first 4 rows are padding, which see only themselves
        valid = torch.ones(2, 13, dtype=torch.bool)
        valid[1, :4] = False
        causal = torch.ones(13, 13, dtype=torch.bool).tril()
        mask = (causal[None] & valid[:, None, :]) | (torch.eye(13, dtype=torch.bool)[None] & ~valid[:, :, None])
        mask = mask[:, None]
    out = attend(q, k, v, mask, True, q.shape[-1] ** -0.5, implementation)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask, True), rtol=1e-5, atol=1e-5)
