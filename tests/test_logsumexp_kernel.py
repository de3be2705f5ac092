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


LARGE_OFFSETS = textwrap.dedent('''
    import tempfile
    import torch
    from aim_llava.reduction.logsumexp import logsumexp_triton

    # three matrices 2^30 + 2^20 elements apart, as a chunk of rows x N keys x heads > 2^31 lays
    # them out: the stride fits int32, the third matrix's offset (2 x stride) does not. They live
    # in a sparse file mapped into memory, so only the pages written take memory or disk.
    stride, rows, cols = 2**30 + 2**20, 8, 40
    elements = 2 * stride + rows * cols
    with tempfile.NamedTemporaryFile() as backing:
        backing.truncate(elements * 4)
        storage = torch.from_file(backing.name, shared=True, size=elements, dtype=torch.float32)
        x = storage.as_strided((1, 3, rows, cols), (3 * stride, stride, cols, 1))
        gen = torch.Generator().manual_seed(0)
        for head in range(3):
            x[0, head] = torch.randn(rows, cols, generator=gen) * 10
        for dim in (-1, -2):
            reference = torch.logsumexp(x.double(), dim=dim)
            assert torch.allclose(logsumexp_triton(x, dim).double(), reference, rtol=1e-5, atol=1e-4), dim
    print("ok")
''')


def test_triton_kernel_offsets_are_64_bit():
    """Element offsets past 2^31 (a user's importance_chunk_size x N x heads): int32 offsets wrap
    and the kernel reads outside the tensor (a crash or wrong values)."""
    run_under_triton_interpreter(LARGE_OFFSETS)


def test_cpu_path_equals_logsumexp_of_the_biased_matrix():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 9, 11, generator=gen)
    rows, cols = torch.randn(1, 2, 9, generator=gen), torch.randn(1, 2, 11, generator=gen)
    assert torch.allclose(logsumexp_with_bias(x, -2, rows), torch.logsumexp(x + rows[..., None], dim=-2))
    assert torch.allclose(logsumexp_with_bias(x, -1, cols), torch.logsumexp(x + cols[..., None, :], dim=-1))
