"""PageRank token importance from a layer's attention, in log space and without an [heads, N, N]
matrix held at once (docs/algorithms.md §3).

With L = QK^T * scale / T plus the causal and key masks, M = softmax(L) over keys, p_0 the start
weights and p_{t+1} = p_t M, the importance of token j is sqrt(mean over heads of p_n[j]^2).

Everything is computed on logarithms: with lse_i the log-normaliser of row i,

    log p_{t+1}[j] = logsumexp_i (log p_t[i] - lse_i + L_ij)

and the importance's logarithm is (logsumexp_h 2 log p[h, j] - log H) / 2. At T = 0.1 most
float32 probabilities of the published formula underflow to exactly 0 (and their squares sooner),
which turns their order into sort-tie order; in log space every score stays distinct and the order
is the published one wherever the published scores differ.

Four kernels compute it:

* ``fused``: a flash-style Triton kernel (:mod:`aim_llava.reduction.attention_lse`) that
  recomputes the logits tile by tile from the model-dtype q and k (float32 accumulation) at every
  pass and keeps only the running log-sum-exp: O(N) extra memory, no host synchronisation, and one
  compiled kernel for every sequence length.
* ``chunked``: plain PyTorch over blocks of query rows (O(chunk x N) extra memory); when the
  whole logit matrix fits a memory budget it is computed once and reused by every step; each step
  is a logsumexp reduction. On CUDA the logits come from the model-dtype q and k with float32
  accumulation and output, and each reduction is one pass over memory (a Triton kernel,
  :mod:`aim_llava.reduction.logsumexp`).
* ``factored`` (:mod:`aim_llava.reduction.factored_importance`): per head, the logits computed
  once (float32 products of the model-dtype q and k) over the causal triangle and kept with their
  exponentials, shifted per block of rows and key; each step is then a batched matrix-vector
  product, and the few block sums that float32 could have underflowed are recomputed exactly in
  log space, decided on the host: the CPU's kernel. A head whose matrices would exceed
  :data:`FACTORED_HEAD_BUDGET` (about 23k tokens) is left to ``chunked``.
* ``flex``: FlexAttention, whose fused kernels return each pass's log-sum-exp without storing the
  matrix: the row normalisers are the LSE of the causal attention, and each PageRank step is the
  LSE of the transposed problem (keys attend to the queries that see them) with
  ``log p_t - lse`` as a per-query bias. Shapes are padded to buckets and the block masks (causal
  and its transpose, which depend on the size alone) are built once per bucket, so the compiled
  kernels are reused across layers and inputs.

``kernel="auto"`` uses ``fused`` on CUDA for float16 and bfloat16 (``flex`` compiles two graphs
for every length bucket a prefill meets, several per 192-frame prefill as the pruned length
shrinks; ``chunked`` rereads an N x N float32 matrix about eight times per call, or recomputes it
at every step once it is larger than the cache budget) and ``factored`` elsewhere. Float32 q and k
on CUDA go to ``chunked``: the fused kernel recomputes the logits at each of its six passes, and in
float32 (IEEE, as the reference needs) it has no tensor cores, where the chunked kernel computes
them once with cuBLAS; compiled for an H100 by the GPU machine's Triton 3.6 it also spills about
8 KB per thread at the default launch shape (``scripts/compile_kernels.py``, docs/benchmarks.md).
On CUDA without Triton (which ``flex`` needs too), and on GPUs for which the fused kernel is not
known to compile to tensor-core code (T4, V100: :data:`aim_llava.capabilities.FUSED_IMPORTANCE_CAPABILITIES`),
``auto`` is ``chunked``. ``fused``, ``chunked`` and ``flex`` never synchronise with the host.

If the fused or the flex kernel raises (a compile error, ``ptxas``, too little shared memory, an
architecture it does not support), ``chunked`` computes the importance instead, for the rest of
the process, after one warning (:data:`aim_llava.capabilities.RUNTIME_FALLBACKS`); so does the
float32-output matrix product of half-precision q and k (``torch.bmm(out_dtype=...)``), replaced
by a product of float32 copies.
"""

from __future__ import annotations

import functools
import math

import torch

from aim_llava.capabilities import HALF_DTYPES, RUNTIME_FALLBACKS, device_capabilities
from aim_llava.model.attention import expand_kv_heads
from aim_llava.reduction.attention_lse import Tiling, attention_lse
from aim_llava.reduction.factored_importance import (
    PANEL_ROWS,
    pagerank_log_importance_factored,
    resident_bytes,
)
from aim_llava.reduction.logsumexp import logsumexp_with_bias

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for one chunk of float32 attention rows
DEFAULT_CACHE_BUDGET = 2**30  # the whole logit matrix is kept (not recomputed) when it is this small
FACTORED_HEAD_BUDGET = 2**30  # bytes one head's resident matrices may take (factored kernel); else chunked
IMPORTANCE_KERNELS = ("auto", "chunked", "factored", "flex", "fused")


def half_products_in_float32(a: torch.Tensor) -> bool:
    """Whether ``a`` is multiplied in its own half precision with float32 output (CUDA only)."""
    return a.is_cuda and a.dtype in HALF_DTYPES


def grouped_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q k^T [B, kv_heads * groups, rows, N] in float32 for q [B, kv_heads, groups, rows, d] and
    k [B, kv_heads, N, d]: the query heads that share a key head are stacked as rows of one matrix
    product, so k is never copied per query head. On CUDA, half-precision inputs are multiplied
    with float32 accumulation and output (tensor cores, no rounding of the logits); where that
    product fails, their float32 copies are multiplied (the same products, exact in float32)."""
    batch, kv_heads, groups, rows, dim = q.shape
    a = q.reshape(batch * kv_heads, groups * rows, dim)
    b = k.transpose(-1, -2).reshape(batch * kv_heads, dim, k.shape[2])

    def upcast():
        return torch.bmm(a.float(), b.float())

    if half_products_in_float32(a):
        out = RUNTIME_FALLBACKS.run("torch.bmm(out_dtype=torch.float32)",
                                    lambda: torch.bmm(a, b, out_dtype=torch.float32), upcast,
                                    "a product of float32 copies")
    else:
        out = upcast()
    return out.view(batch, kv_heads * groups, rows, k.shape[2])


def attention_logit_chunks(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, scale: float, chunk: int):
    """Yield (start, end, logits [B, H, c, N] float32) with causal and key masking applied (-inf)."""
    batch, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    q_grouped = q.reshape(batch, kv_heads, heads // kv_heads, n, dim)
    key_index = torch.arange(n, device=q.device)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        logits = grouped_logits(q_grouped[:, :, :, start:end], k).mul_(scale)
        causal = key_index[None, :] <= torch.arange(start, end, device=q.device)[:, None]
        allowed = causal[None] & key_mask[:, None, :]
        yield start, end, logits.masked_fill_(~allowed[:, None], float("-inf"))


def row_probabilities(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over keys in place; rows that see nothing become zeros. Returns (probs, lse)."""
    lse = torch.logsumexp(logits, dim=-1)
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return logits.sub_(lse[..., None]).exp_(), lse


def log_start_weights(valid: torch.Tensor) -> torch.Tensor:
    """log p_0 [B, N]: uniform over each sample's real rows (-inf on padding)."""
    counts = valid.sum(dim=1, keepdim=True).clamp(min=1).float()
    return torch.where(valid, -torch.log(counts), torch.full(valid.shape, float("-inf"), device=valid.device))


def head_log_importance(log_p: torch.Tensor) -> torch.Tensor:
    """log sqrt(mean over heads of p^2) from log p [B, H, N]."""
    return 0.5 * (torch.logsumexp(2 * log_p, dim=1) - math.log(log_p.shape[1]))


def row_bias(log_p: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log p_t[i] - lse_i, with rows that see nothing (lse = -inf) contributing nothing."""
    return torch.where(torch.isinf(lse), torch.full_like(lse, float("-inf")), log_p - lse)


def chunk_plan(q: torch.Tensor, chunk_size: int | None, memory_budget: int, cache_budget: int) -> tuple[int, bool]:
    """Query rows per chunk (from the memory budget unless given), and whether the whole float32
    logit matrix fits the cache budget (then it is computed once and kept)."""
    batch, heads, n, _ = q.shape
    row_bytes = max(1, batch * heads * n * 4)
    return chunk_size or max(1, memory_budget // row_bytes), row_bytes * n <= cache_budget


def pagerank_log_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor,
    log_start: torch.Tensor,
    scale: float,
    temperature: float = 0.1,
    iterations: int = 5,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    cache_budget: int = DEFAULT_CACHE_BUDGET,
) -> torch.Tensor:
    """Log-importance [B, N] (float32) of every token, by query chunks.

    q [B, H, N, d] and k [B, H_kv, N, d] are the layer's rotated queries and keys; key_mask [B, N]
    says which tokens may be attended (besides causality); log_start [B, N] is log p_0. Tokens that
    receive no attention get -inf.
    """
    batch, heads, n, _ = q.shape
    chunk, keep = chunk_plan(q, chunk_size, memory_budget, cache_budget)
    scale = scale / temperature
    cached, lse_parts = [], []
    for start, end, logits in attention_logit_chunks(q, k, key_mask, scale, chunk):
        lse_parts.append(logsumexp_with_bias(logits, -1))
        if keep:
            cached.append((start, end, logits))
    lse = torch.cat(lse_parts, dim=-1)
    log_p = log_start.float()[:, None, :].expand(batch, heads, n)
    for _ in range(iterations):
        bias = row_bias(log_p, lse)
        blocks = cached if keep else attention_logit_chunks(q, k, key_mask, scale, chunk)
        total = None
        for start, end, logits in blocks:
            part = logsumexp_with_bias(logits, -2, bias[..., start:end])
            total = part if total is None else torch.logaddexp(total, part)
        log_p = total
    return head_log_importance(log_p)


def pagerank_importance(q, k, key_mask, start_weights, scale, temperature=0.1, iterations=5, chunk_size=None,
                        memory_budget=DEFAULT_MEMORY_BUDGET, cache_budget=DEFAULT_CACHE_BUDGET) -> torch.Tensor:
    """The importance itself, exp of :func:`pagerank_log_importance` (start_weights [B, N] is p_0)."""
    log_start = torch.log(start_weights.float())
    return pagerank_log_importance(q, k, key_mask, log_start, scale, temperature, iterations, chunk_size,
                                   memory_budget, cache_budget).exp()


FLEX_GRAPHS_PER_SHAPE = 2  # the row pass and the column pass


def flex_bucket(n: int) -> int:
    """Padded length for the compiled flex kernels: multiples of 256 up to 2048, then multiples of
    a quarter of the power of two below ``n`` (at most 25% padding; 4 buckets per doubling, so a
    32k-token context needs 24 compiled shapes)."""
    step = 256 if n <= 2048 else 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


@functools.cache
def flex_kernel(device_type: str):
    """FlexAttention: compiled with static shapes on CUDA (one kernel per input shape, see
    :func:`allow_flex_shape`), eager elsewhere (a dense reference implementation, for checking)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    return torch.compile(flex_attention, dynamic=False)


FLEX_SHAPES: set[tuple] = set()  # the flex input shapes met so far in this process


def allow_flex_shape(shape: tuple) -> None:
    """Let dynamo keep a compiled pair of flex graphs for ``shape`` besides those of every shape
    met before. Each (length bucket, batch size, heads, dtype) compiles its own pair; past
    dynamo's recompile limits (8 graphs by default) the compiled function would silently fall
    back to the dense, uncompiled implementation (an N x N matrix per head). The limits follow
    the shapes actually met, so that a process serving many lengths and batch sizes never
    reaches them."""
    if shape in FLEX_SHAPES:
        return
    import torch._dynamo.config as dynamo_config

    FLEX_SHAPES.add(shape)
    graphs = FLEX_GRAPHS_PER_SHAPE * len(FLEX_SHAPES)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, graphs)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, graphs)


def _causal(b, h, query_index, key_index):
    return key_index <= query_index


def _seen_by_later(b, h, key_index_as_query, query_index_as_key):
    return query_index_as_key >= key_index_as_query


@functools.lru_cache(maxsize=64)
def triangle_block_mask(kind: str, n: int, device: str):
    """The causal block mask (``rows``) or its transpose (``columns``) for length ``n``; they depend
    on the size alone, so each is built once per bucket."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = _causal if kind == "rows" else _seen_by_later
    return create_block_mask(mask_mod, None, None, n, n, device=device, _compile=device.startswith("cuda"))


def _flex_lse(flex, query, key, block_mask, scale, score_mod, enable_gqa=False) -> torch.Tensor:
    from torch.nn.attention.flex_attention import AuxRequest

    value = query.new_zeros(query.shape[0], key.shape[1], key.shape[2], 16)
    _, aux = flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                  enable_gqa=enable_gqa, return_aux=AuxRequest(lse=True))
    return aux.lse.float()


def pagerank_log_importance_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor,
    log_start: torch.Tensor,
    scale: float,
    temperature: float = 0.1,
    iterations: int = 5,
    bucketed: bool | None = None,
) -> torch.Tensor:
    """The same log-importance with FlexAttention: O(N) extra memory, fused kernels on CUDA.

    ``bucketed`` pads the sequence to its :func:`flex_bucket` length (padding is masked out) so
    that the compiled kernels and block masks are reused across lengths; the default is to do so
    on CUDA, where they are compiled.
    """
    batch, heads, n, _ = q.shape
    padded = flex_bucket(n) if (q.is_cuda if bucketed is None else bucketed) else n
    pad = padded - n

    def extend(tensor, value):
        if not pad:
            return tensor
        shape = list(tensor.shape)
        axis = 2 if tensor.dim() == 4 else 1
        shape[axis] = pad
        return torch.cat([tensor, tensor.new_full(shape, value)], dim=axis)

    dtype = q.dtype if q.is_cuda else torch.float32
    qf, kf = extend(q.to(dtype), 0).contiguous(), extend(k.to(dtype), 0).contiguous()
    keys_allowed = extend(key_mask, False)
    log_p = extend(log_start.float(), float("-inf"))[:, None, :].expand(batch, heads, padded)
    flex = flex_kernel(q.device.type)
    allow_flex_shape((str(q.device), tuple(qf.shape), tuple(kf.shape), qf.dtype))
    device = str(q.device)
    scale = scale / temperature
    masked = torch.where(keys_allowed, 0.0, float("-inf"))

    def mask_keys(score, b, h, query_index, key_index):
        return score + masked[b, key_index]

    lse = _flex_lse(flex, qf, kf, triangle_block_mask("rows", padded, device), scale, mask_keys, enable_gqa=True)
    keys_as_queries = expand_kv_heads(kf, heads)
    for _ in range(iterations):
        bias = row_bias(log_p, lse)

        def add_row_bias(score, b, h, key_index_as_query, query_index_as_key):
            return score + bias[b, h, query_index_as_key] + masked[b, key_index_as_query]

        log_p = _flex_lse(flex, keys_as_queries, qf, triangle_block_mask("columns", padded, device), scale,
                          add_row_bias)
    return head_log_importance(log_p)[:, :n]


def pagerank_log_importance_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor,
    log_start: torch.Tensor,
    scale: float,
    temperature: float = 0.1,
    iterations: int = 5,
    tiling: Tiling = Tiling(),
) -> torch.Tensor:
    """The same log-importance with the flash-style Triton kernel of
    :mod:`aim_llava.reduction.attention_lse`: logits recomputed in tiles from the model-dtype q and
    k at every pass (O(N) extra memory), one compiled kernel for every length (on CUDA, or on any
    device under ``TRITON_INTERPRET=1``)."""
    batch, heads, n, _ = q.shape
    scale = scale / temperature
    key_bias = torch.where(key_mask, 0.0, float("-inf"))
    lse = attention_lse(q, k, heads, scale, key_bias, torch.zeros_like(key_bias), True, tiling)
    log_p = log_start.float()[:, None, :].expand(batch, heads, n)
    for _ in range(iterations):
        log_p = attention_lse(k, q, heads, scale, row_bias(log_p, lse), key_bias, False, tiling)
    return head_log_importance(log_p)


def auto_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """The kernel ``auto`` means for q and k of ``dtype`` on ``device``, by its capabilities (see
    the module docstring)."""
    return device_capabilities(str(device)).importance_kernel(dtype)


FALLIBLE_KERNELS = {"fused": pagerank_log_importance_fused, "flex": pagerank_log_importance_flex}


def log_importance(q, k, key_mask, log_start, scale, temperature=0.1, iterations=5, kernel="auto",
                   chunk_size=None) -> torch.Tensor:
    """Dispatch to a kernel (see the module docstring); a failing ``fused`` or ``flex`` kernel is
    replaced by ``chunked``."""
    if kernel == "auto":
        kernel = auto_kernel(q.device, q.dtype)

    def chunked():
        return pagerank_log_importance(q, k, key_mask, log_start, scale, temperature, iterations, chunk_size)

    if kernel == "factored":
        panel_rows = PANEL_ROWS if chunk_size is None else chunk_size
        if resident_bytes(q.shape[2], panel_rows) > FACTORED_HEAD_BUDGET:
            return chunked()
        return pagerank_log_importance_factored(q, k, key_mask, log_start, scale, temperature, iterations,
                                                panel_rows)

    if kernel in FALLIBLE_KERNELS:
        return RUNTIME_FALLBACKS.run(
            f"the {kernel} importance kernel",
            lambda: FALLIBLE_KERNELS[kernel](q, k, key_mask, log_start, scale, temperature, iterations),
            chunked, "the chunked kernel")
    return chunked()
