"""Log-sum-exp of a matrix along one axis, plus a bias along that axis, in one pass over memory.

The chunked importance kernel (docs/algorithms.md §3) reduces its cached logit matrix once for
the row normalisers and once per PageRank step over the rows (``logsumexp_i (bias_i + L_ij)``).
``torch.logsumexp(L + bias)`` makes about eight passes over the matrix (the sum, the maximum, the
shift, the exponential, the sum); on a GPU, where those passes are memory-bound, the Triton kernel
here reads each element once with a running maximum and a rescaled running sum (the online
softmax normaliser). Elsewhere, without Triton, or once the kernel has failed in this process
(:data:`aim_llava.capabilities.RUNTIME_FALLBACKS`), the PyTorch expression is used.
"""

from __future__ import annotations

import functools

import torch

from aim_llava.capabilities import RUNTIME_FALLBACKS


def logsumexp_with_bias(x: torch.Tensor, dim: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``logsumexp(x + bias, dim)`` for x [B, H, R, C] float32 and ``dim`` -1 or -2; ``bias``
    [B, H, size of dim] is added along the reduced axis (None: no bias). -inf entries are allowed;
    a line that is all -inf gives -inf."""
    if use_triton(x):
        return RUNTIME_FALLBACKS.run("the Triton log-sum-exp kernel", lambda: logsumexp_triton(x, dim, bias),
                                     lambda: logsumexp_torch(x, dim, bias), "torch.logsumexp")
    return logsumexp_torch(x, dim, bias)


def use_triton(x: torch.Tensor) -> bool:
    """Whether ``x`` is reduced by the Triton kernel (a CUDA tensor, Triton importable)."""
    return x.is_cuda and triton_kernel() is not None


def logsumexp_torch(x: torch.Tensor, dim: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`logsumexp_with_bias` as a PyTorch expression (several passes over ``x``)."""
    if bias is not None:
        x = x + (bias[..., :, None] if dim in (-2, 2) else bias[..., None, :])
    return torch.logsumexp(x, dim=dim)


@functools.cache
def triton_kernel():
    """The Triton kernel, or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def reduce_lines(x_ptr, bias_ptr, out_ptr, n_reduced, n_kept, stride_x_bh, stride_x_reduced, stride_x_kept,
                     stride_bias_bh, stride_out_bh, HAS_BIAS: tl.constexpr, BLOCK_REDUCED: tl.constexpr,
                     BLOCK_KEPT: tl.constexpr):
        # int64 offsets: a chunk of rows x N keys x heads may exceed 2^31 elements
        bh = tl.program_id(0).to(tl.int64)
        kept = tl.program_id(1).to(tl.int64) * BLOCK_KEPT + tl.arange(0, BLOCK_KEPT)
        running_max = tl.full([BLOCK_KEPT], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_KEPT], tl.float32)
        for start in range(0, n_reduced, BLOCK_REDUCED):
            reduced = start + tl.arange(0, BLOCK_REDUCED).to(tl.int64)
            inside = (reduced[:, None] < n_reduced) & (kept[None, :] < n_kept)
            tile = tl.load(x_ptr + bh * stride_x_bh + reduced[:, None] * stride_x_reduced + kept[None, :] * stride_x_kept,
                           mask=inside, other=float("-inf"))
            if HAS_BIAS:
                bias = tl.load(bias_ptr + bh * stride_bias_bh + reduced, mask=reduced < n_reduced, other=float("-inf"))
                tile = tile + bias[:, None]
            new_max = tl.maximum(running_max, tl.max(tile, axis=0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(tile - shift[None, :]), axis=0)
            running_max = new_max
        result = tl.where(running_max == float("-inf"), float("-inf"), running_max + tl.log(running_sum))
        tl.store(out_ptr + bh * stride_out_bh + kept, result, mask=kept < n_kept)

    return reduce_lines


def launch_arguments(x: torch.Tensor, dim: int, bias: torch.Tensor | None, out: torch.Tensor,
                     block_reduced: int = 32, block_kept: int = 64) -> tuple[tuple, dict, tuple[int, int]]:
    """The kernel's arguments, compile-time constants and grid for ``x`` [B, H, R, C] reduced along
    ``dim`` into ``out`` [B * H, kept]; shared with the offline compile check
    (:mod:`aim_llava.offline_compile`), so that it compiles what a launch would."""
    batch, heads, rows, cols = x.shape
    flat = x.reshape(batch * heads, rows, cols)
    if dim in (-2, 2):
        n_reduced, n_kept, stride_reduced, stride_kept = rows, cols, flat.stride(1), flat.stride(2)
    else:
        n_reduced, n_kept, stride_reduced, stride_kept = cols, rows, flat.stride(2), flat.stride(1)
    flat_bias = bias.reshape(batch * heads, n_reduced) if bias is not None else out
    arguments = (flat, flat_bias, out, n_reduced, n_kept, flat.stride(0), stride_reduced, stride_kept,
                 flat_bias.stride(0), out.stride(0))
    options = dict(HAS_BIAS=bias is not None, BLOCK_REDUCED=block_reduced, BLOCK_KEPT=block_kept)
    return arguments, options, (batch * heads, -(-n_kept // block_kept))


def logsumexp_triton(x: torch.Tensor, dim: int, bias: torch.Tensor | None = None,
                     block_reduced: int = 32, block_kept: int = 64) -> torch.Tensor:
    """:func:`logsumexp_with_bias` by the Triton kernel (on CUDA, or on any device under
    ``TRITON_INTERPRET=1``)."""
    batch, heads, rows, cols = x.shape
    out = torch.empty(batch * heads, cols if dim in (-2, 2) else rows, dtype=torch.float32, device=x.device)
    arguments, options, grid = launch_arguments(x, dim, bias, out, block_reduced, block_kept)
    triton_kernel()[grid](*arguments, **options)
    return out.view(batch, heads, out.shape[1])
