"""Log-sum-exp of causal attention logits, computed tile by tile from q and k (flash-style): the
[heads, N, N] logit matrix is never stored, and its products run on tensor cores in the model's
dtype with float32 accumulation.

The PageRank importance (docs/algorithms.md §3) needs two such reductions of
L_ij = scale * q_i . k_j (j <= i):

* over keys, for each query row:      ``lse_i  = logsumexp_{j <= i} (L_ij + key_bias_j)``
* over queries, for each key column:  ``out_j  = logsumexp_{i >= j} (L_ij + row_bias_i) + key_bias_j``

One Triton kernel does both: each program owns a block of "outer" positions (query rows, or key
columns) of one head and loops over the causally visible "inner" positions with a running
maximum and a rescaled running sum. The sequence length is a runtime argument, so one compiled
kernel serves every length (no padding to buckets, no recompilation); the query heads that share
a key head (GQA) read the same k without copying it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from aim_llava.reduction.schedule import ScheduleError


@dataclass(frozen=True)
class Tiling:
    """Launch shape of the kernel: positions per program (outer), per loop step (inner), warps
    and software-pipeline stages. ``scripts/bench_importance.py --fused-tilings`` times others."""

    block_outer: int = 64
    block_inner: int = 64
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def parse(cls, text: str) -> Tiling:
        """``OUTERxINNERxWARPSxSTAGES``, e.g. ``128x64x8x3``."""
        return cls(*(int(part) for part in text.split("x")))

    def __str__(self) -> str:
        return f"{self.block_outer}x{self.block_inner}x{self.num_warps}x{self.num_stages}"


@functools.cache
def attention_lse_kernel():
    """The Triton kernel, or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit(do_not_specialize=["n"])  # one compiled kernel for every length, not one per n % 16
    def reduce_attention(outer_ptr, inner_ptr, inner_bias_ptr, outer_bias_ptr, out_ptr, n, heads,
                         outer_group, inner_group, dim, scale,
                         stride_outer_b, stride_outer_h, stride_outer_n, stride_outer_d,
                         stride_inner_b, stride_inner_h, stride_inner_n, stride_inner_d,
                         stride_inner_bias_b, stride_inner_bias_h, stride_outer_bias_b, stride_outer_bias_h,
                         OUTER_IS_QUERY: tl.constexpr, IEEE: tl.constexpr, BLOCK_OUTER: tl.constexpr,
                         BLOCK_INNER: tl.constexpr, BLOCK_DIM: tl.constexpr):
        bh = tl.program_id(0)
        batch, head = (bh // heads).to(tl.int64), bh % heads  # 64-bit offsets: a batch may span > 2^31 elements
        outer = tl.program_id(1) * BLOCK_OUTER + tl.arange(0, BLOCK_OUTER)
        dims = tl.arange(0, BLOCK_DIM)
        outer_tile = tl.load(outer_ptr + batch * stride_outer_b + (head // outer_group) * stride_outer_h
                             + outer[:, None] * stride_outer_n + dims[None, :] * stride_outer_d,
                             mask=(outer[:, None] < n) & (dims[None, :] < dim), other=0.0)
        inner_base = inner_ptr + batch * stride_inner_b + (head // inner_group) * stride_inner_h
        bias_base = inner_bias_ptr + batch * stride_inner_bias_b + head * stride_inner_bias_h
        if OUTER_IS_QUERY:  # keys j <= i
            start, stop = 0, tl.minimum(n, (tl.program_id(1) + 1) * BLOCK_OUTER)
        else:  # queries i >= j
            start, stop = tl.program_id(1) * BLOCK_OUTER, n
        running_max = tl.full([BLOCK_OUTER], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_OUTER], tl.float32)
        for block in range(start, stop, BLOCK_INNER):
            inner = block + tl.arange(0, BLOCK_INNER)
            inner_tile = tl.load(inner_base + inner[:, None] * stride_inner_n + dims[None, :] * stride_inner_d,
                                 mask=(inner[:, None] < n) & (dims[None, :] < dim), other=0.0)
            if IEEE:
                logits = tl.dot(outer_tile, tl.trans(inner_tile), input_precision="ieee")
            else:
                logits = tl.dot(outer_tile, tl.trans(inner_tile))
            bias = tl.load(bias_base + inner, mask=inner < n, other=float("-inf"))
            logits = logits * scale + bias[None, :]
            if OUTER_IS_QUERY:
                visible = inner[None, :] <= outer[:, None]
            else:
                visible = inner[None, :] >= outer[:, None]
            logits = tl.where(visible, logits, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
            running_max = new_max
        result = tl.where(running_max == float("-inf"), float("-inf"), running_max + tl.log(running_sum))
        outer_bias = tl.load(outer_bias_ptr + batch * stride_outer_bias_b + head * stride_outer_bias_h + outer,
                             mask=outer < n, other=0.0)
        tl.store(out_ptr + bh * n + outer, result + outer_bias, mask=outer < n)

    return reduce_attention


def _heads_strides(bias: torch.Tensor) -> tuple[int, int]:
    """(batch, head) strides of a [B, N] (shared by the heads) or [B, H, N] bias."""
    return (bias.stride(0), 0) if bias.dim() == 2 else (bias.stride(0), bias.stride(1))


def launch_arguments(outer: torch.Tensor, inner: torch.Tensor, heads: int, scale: float, inner_bias: torch.Tensor,
                     outer_bias: torch.Tensor, out: torch.Tensor, outer_is_query: bool,
                     tiling: Tiling) -> tuple[tuple, dict, tuple[int, int]]:
    """The kernel's arguments, its compile-time constants and launch options, and its grid for one
    pass (see :func:`attention_lse`); shared with the offline compile check
    (:mod:`aim_llava.offline_compile`), so that it compiles what a launch would."""
    batch, _, n, dim = outer.shape
    arguments = (outer, inner, inner_bias, outer_bias, out, n, heads, heads // outer.shape[1], heads // inner.shape[1],
                 dim, scale, *outer.stride(), *inner.stride(), *_heads_strides(inner_bias),
                 *_heads_strides(outer_bias))
    options = dict(OUTER_IS_QUERY=outer_is_query, IEEE=outer.dtype == torch.float32, BLOCK_OUTER=tiling.block_outer,
                   BLOCK_INNER=tiling.block_inner, BLOCK_DIM=max(16, 1 << (dim - 1).bit_length()),
                   num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    return arguments, options, (batch * heads, -(-n // tiling.block_outer))


def attention_lse(outer: torch.Tensor, inner: torch.Tensor, heads: int, scale: float, inner_bias: torch.Tensor,
                  outer_bias: torch.Tensor, outer_is_query: bool, tiling: Tiling = Tiling()) -> torch.Tensor:
    """One causal log-sum-exp pass, [B, heads, N] float32 (see the module docstring).

    ``outer`` and ``inner`` are [B, H_x, N, d] in one dtype, one of them the queries (``heads``
    heads) and the other the keys (``heads / groups`` heads); ``outer_is_query`` says which.
    ``inner_bias`` and ``outer_bias`` are float32 [B, N] (shared by every head) or [B, heads, N];
    -inf excludes a position. An outer position that sees nothing gets -inf (plus its bias).
    """
    reduce_attention = attention_lse_kernel()
    if reduce_attention is None or not (outer.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ScheduleError("importance_kernel 'fused' needs a CUDA device with Triton; use 'auto' (or 'factored' "
                            "on the CPU)")
    batch, _, n, _ = outer.shape
    inner_bias, outer_bias = inner_bias.contiguous(), outer_bias.contiguous()  # read with unit stride along N
    out = torch.empty(batch, heads, n, dtype=torch.float32, device=outer.device)
    if n == 0:
        return out
    arguments, options, grid = launch_arguments(outer, inner, heads, scale, inner_bias, outer_bias, out,
                                                outer_is_query, tiling)
    reduce_attention[grid](*arguments, **options)
    return out
