"""The flash-style attention log-sum-exp kernel (Triton, run here by Triton's interpreter on the
CPU) against dense float64 computations: each pass alone, and the whole PageRank importance
against the dense formula (docs/algorithms.md §3). The interpreter cannot multiply bfloat16
tiles (its tl.dot returns garbage for them), so half precision is checked in float16 here and in
bfloat16 by the GPU tier (tests/gpu)."""

import textwrap

import pytest
from conftest import run_under_triton_interpreter

CHECK = textwrap.dedent('''
    import torch
    from test_importance import dense_log_importance
    from aim_llava.reduction.attention_lse import Tiling, attention_lse
    from aim_llava.reduction.importance import log_start_weights, pagerank_log_importance_fused

    def dense_pass(outer, inner, heads, scale, inner_bias, outer_bias, outer_is_query):
        """The pass as written: the whole float64 matrix L[b, h, i, j] = scale q_i . k_j, j <= i."""
        q, k = (outer, inner) if outer_is_query else (inner, outer)
        k = k.double().repeat_interleave(heads // k.shape[1], dim=1)
        q = q.double().repeat_interleave(heads // q.shape[1], dim=1)
        n = q.shape[2]
        logits = (q @ k.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
        expand = lambda b: b.double()[:, None] if b.dim() == 2 else b.double()
        if outer_is_query:  # reduce over keys j
            return torch.logsumexp(logits + expand(inner_bias)[..., None, :], dim=-1) + expand(outer_bias)
        return torch.logsumexp(logits + expand(inner_bias)[..., :, None], dim=-2) + expand(outer_bias)

    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, n, dim = 2, 6, 2, 77, 24   # GQA groups of 3; n and dim off the block sizes
    q = (torch.randn(batch, n, heads, dim, generator=gen) * 2).transpose(1, 2)  # strided, as the model's
    k = torch.randn(batch, kv_heads, n, dim, generator=gen) * 2
    key_bias = torch.zeros(batch, n)
    key_bias[1, :5] = float("-inf")                         # left padding: rows 0-4 of sample 1 see nothing
    key_bias[0, 30:33] = float("-inf")                      # keys pruned earlier (mask mode)
    row_bias = torch.randn(batch, heads, n, generator=gen) * 3
    row_bias[0, 2, 60:] = float("-inf")                     # rows that contribute nothing
    cases = [(q, k, key_bias, torch.zeros(batch, n), True), (k, q, row_bias, key_bias, False)]
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        for outer, inner, inner_bias, outer_bias, outer_is_query in cases:
            outer, inner = outer.to(dtype), inner.to(dtype)
            reference = dense_pass(outer, inner, heads, 0.7, inner_bias, outer_bias, outer_is_query)
            for blocks in ("16x16x4x2", "32x64x4x3", "64x16x8x1"):
                tiling = Tiling.parse(blocks)
                assert str(tiling) == blocks
                ours = attention_lse(outer, inner, heads, 0.7, inner_bias, outer_bias, outer_is_query, tiling)
                assert ours.dtype == torch.float32 and ours.shape == reference.shape
                assert torch.equal(torch.isinf(ours), torch.isinf(reference)), (dtype, outer_is_query, blocks)
                finite = torch.isfinite(reference)
                error = ((ours.double() - reference)[finite].abs() / reference[finite].abs().clamp(min=1)).max()
                assert error < tolerance, (dtype, outer_is_query, blocks, error.item())

    # the whole importance, left-padded batch with masked keys, against the float64 dense formula
    q, k = torch.randn(2, 4, 150, 16, generator=gen) * 3, torch.randn(2, 2, 150, 16, generator=gen) * 3
    key_mask = torch.rand(2, 150, generator=gen) > 0.1
    valid = torch.ones(2, 150, dtype=torch.bool)
    valid[1, :9] = False
    key_mask &= valid
    start = valid.double() / valid.sum(dim=1, keepdim=True)
    reference = dense_log_importance(q, k, key_mask, start, 0.25)
    ours = pagerank_log_importance_fused(q, k, key_mask, log_start_weights(valid), 0.25)
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    finite = torch.isfinite(reference)
    assert torch.allclose(ours.double()[finite], reference[finite], rtol=1e-4, atol=1e-3)
    for sample in range(2):
        half = int(valid[sample].sum()) // 2
        assert torch.equal(ours[sample].topk(half).indices.sort().values,
                           reference[sample].topk(half).indices.sort().values)

    # sharp logits (most float32 probabilities of the published formula underflow): the same order
    from test_importance import sharp_inputs
    q, k, mask, start = sharp_inputs()  # 300 tokens, as the chunked kernels are checked
    reference = dense_log_importance(q, k, mask, start, 16**-0.5)[0]
    ours = pagerank_log_importance_fused(q, k, mask, torch.log(start), 16**-0.5)[0]
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours.double(), reference, rtol=1e-4, atol=1e-3)
    assert torch.equal(ours.argsort(descending=True), reference.argsort(descending=True))
    print("ok")
''')


def test_fused_attention_lse_equals_dense_float64():
    run_under_triton_interpreter(CHECK)


def test_fused_kernel_on_the_cpu_is_a_clear_error(monkeypatch):
    import torch

    from aim_llava.reduction.importance import log_importance
    from aim_llava.reduction.schedule import ScheduleError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 8, 16)
    with pytest.raises(ScheduleError, match="needs a CUDA device"):
        log_importance(q, k, torch.ones(1, 8, dtype=torch.bool), torch.zeros(1, 8), 0.25, kernel="fused")
