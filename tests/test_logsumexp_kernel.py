"""The one-pass log-sum-exp kernel (Triton; run here by Triton's interpreter on the CPU) against
torch.logsumexp in float64, for the shapes and -inf patterns of the importance kernel."""

import textwrap

import torch
from conftest import run_under_triton_interpreter

from aim_llava.reduction.logsumexp import logsumexp_with_bias

CHECK = textwrap.dedent('''
    import torch
    from aim_llava.reduction.logsumexp import logsumexp_triton
    from aim_llava.reduction.logsumexp import logsumexp_with_bias as torch_path

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 45, 70, generator=gen) * 30
    x[0, 1, :, 7] = float("-inf")           # a key nobody may attend to
    x[1, 0, 4, :] = float("-inf")           # a row that sees nothing
    x.masked_fill_(torch.rand(x.shape, generator=gen) < 0.3, float("-inf"))
    full_bias = torch.randn(2, 3, 100, generator=gen) * 10
    full_bias[0, 2, 10:13] = float("-inf")  # padding rows
    bias = full_bias[..., 5:50]             # a slice, as the chunked kernel passes it
    checks = [(-2, bias), (-2, None), (-1, None), (-1, full_bias[..., :70])]
    for dim, b in checks:
        for blocks in ((32, 64), (16, 16), (8, 128)):
            ours = logsumexp_triton(x, dim, b, *blocks)
            shifted = x.double() + (0 if b is None else (b.double()[..., :, None] if dim == -2 else b.double()[..., None, :]))
            reference = torch.logsumexp(shifted, dim=dim)
            assert ours.shape == reference.shape, (dim, ours.shape)
            assert torch.equal(torch.isinf(ours), torch.isinf(reference)), (dim, blocks)
            finite = torch.isfinite(reference)
            assert torch.allclose(ours.double()[finite], reference[finite], rtol=1e-5, atol=1e-4), (dim, blocks)

    # the chunked importance kernel with its reductions done by the Triton kernel (as on CUDA)
    from aim_llava.reduction import importance
    q, k = torch.randn(2, 4, 150, 16, generator=gen) * 3, torch.randn(2, 2, 150, 16, generator=gen) * 3
    mask = torch.rand(2, 150, generator=gen) > 0.1
    log_start = importance.log_start_weights(torch.ones(2, 150, dtype=torch.bool))
    for cache_budget in (0, 2**30):
        reference = importance.pagerank_log_importance(q, k, mask, log_start, 0.25, chunk_size=64,
                                                       cache_budget=cache_budget)
        importance.logsumexp_with_bias = lambda x, dim, bias=None: logsumexp_triton(x, dim, bias)
        fused = importance.pagerank_log_importance(q, k, mask, log_start, 0.25, chunk_size=64,
                                                   cache_budget=cache_budget)
        importance.logsumexp_with_bias = torch_path
        assert torch.equal(torch.isinf(fused), torch.isinf(reference))
        finite = torch.isfinite(reference)
        assert torch.allclose(fused[finite], reference[finite], rtol=1e-4, atol=1e-3), cache_budget
        assert torch.equal(fused.topk(75).indices.sort().values, reference.topk(75).indices.sort().values)
    print("ok")
''')


def test_triton_kernel_equals_logsumexp_in_float64():
    run_under_triton_interpreter(CHECK)


def test_cpu_path_equals_logsumexp_of_the_biased_matrix():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 9, 11, generator=gen)
    rows, cols = torch.randn(1, 2, 9, generator=gen), torch.randn(1, 2, 11, generator=gen)
    assert torch.allclose(logsumexp_with_bias(x, -2, rows), torch.logsumexp(x + rows[..., None], dim=-2))
    assert torch.allclose(logsumexp_with_bias(x, -1, cols), torch.logsumexp(x + cols[..., None, :], dim=-1))
