"""Token importance from a layer's attention, computed in query chunks (no [heads, N, N] matrix).

PageRank importance (docs/algorithms.md §3): with M = softmax((QK^T / sqrt(d) + causal mask) / T) over
keys, p_0 the given start weights (1/N each in the published method) and p_{t+1} = p_t @ M,
the importance of token j is sqrt(mean over heads of p_n[j]^2).

Each application of M is done a chunk of query rows at a time, so the extra memory is
O(chunk x N) per head; the row normalisers (log-sum-exp) are computed in a first pass. When the
whole matrix fits the memory budget it is computed once and reused by all iterations.
"""

from __future__ import annotations

import functools

import torch

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for one chunk of float32 attention rows
DEFAULT_CACHE_BUDGET = 2**30  # the whole matrix is kept (not recomputed) when it is this small


def attention_logit_chunks(
    q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, scale: float, chunk: int
):
    """Yield (start, end, logits [B, H, c, N]) with causal and key masking applied (-inf)."""
    batch, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    q_grouped = q.float().reshape(batch, kv_heads, heads // kv_heads, n, dim)
    k_t = k.float().transpose(-1, -2)[:, :, None]
    key_index = torch.arange(n, device=q.device)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        logits = torch.matmul(q_grouped[:, :, :, start:end], k_t).mul_(scale)
        causal = key_index[None, :] <= torch.arange(start, end, device=q.device)[:, None]
        allowed = causal[None] & key_mask[:, None, :]
        logits = logits.reshape(batch, heads, end - start, n).masked_fill_(~allowed[:, None], float("-inf"))
        yield start, end, logits


def row_probabilities(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over keys in place; rows that see nothing become zeros. Returns (probs, lse)."""
    lse = torch.logsumexp(logits, dim=-1)
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return logits.sub_(lse[..., None]).exp_(), lse


def pagerank_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor,
    start_weights: torch.Tensor,
    scale: float,
    temperature: float = 0.1,
    iterations: int = 5,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    cache_budget: int = DEFAULT_CACHE_BUDGET,
) -> torch.Tensor:
    """Importance [B, N] (float32) of every token.

    q [B, H, N, d] and k [B, H_kv, N, d] are the layer's rotated queries and keys; key_mask [B, N]
    says which tokens may be attended (besides causality); start_weights [B, N] is p_0. Rows
    that can attend to nothing contribute nothing. When the whole matrix fits ``cache_budget``
    bytes it is computed once (softmax per chunk) and reused by every step; otherwise the first
    pass keeps each chunk's row normalisers (with the first step) and later steps recompute the
    chunks.
    """
    batch, heads, n, _ = q.shape
    row_bytes = max(1, batch * heads * n * 4)
    chunk = chunk_size or max(1, memory_budget // row_bytes)
    keep = row_bytes * n <= cache_budget
    scale = scale / temperature
    p = start_weights.float()[:, None, :].expand(batch, heads, n)
    nxt = torch.zeros(batch, heads, n, device=q.device, dtype=torch.float32)
    # Rows that can attend to nothing (left padding) are zeroed; softmax alone would give NaN.
    blind = key_mask.long().cumsum(dim=1) == 0
    any_blind = bool(blind.any())
    lse_parts, cached = [], []
    for start, end, logits in attention_logit_chunks(q, k, key_mask, scale, chunk):
        if keep:
            probs = torch.softmax(logits, dim=-1)
            if any_blind:
                probs.masked_fill_(blind[:, None, start:end, None], 0.0)
            cached.append((start, end, probs))
        else:
            probs, lse = row_probabilities(logits)
            lse_parts.append(lse)
        nxt += torch.matmul(p[..., None, start:end], probs).squeeze(-2)
    lse = torch.cat(lse_parts, dim=-1) if lse_parts else None
    p = nxt
    for _ in range(iterations - 1):
        nxt = torch.zeros_like(p)
        if keep:
            blocks = cached
        else:
            blocks = (
                (start, end, logits.sub_(lse[..., start:end, None]).exp_())
                for start, end, logits in attention_logit_chunks(q, k, key_mask, scale, chunk)
            )
        for start, end, probs in blocks:
            nxt += torch.matmul(p[..., None, start:end], probs).squeeze(-2)
        p = nxt
    return p.pow(2).mean(dim=1).sqrt()


@functools.cache
def flex_kernel(device_type: str):
    """FlexAttention, compiled into a fused kernel on GPU (eager, dense reference on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=True)
    return flex_attention


def _log_sum_exp_rows(flex, query, key, block_mask, scale, score_mod=None, enable_gqa=False) -> torch.Tensor:
    from torch.nn.attention.flex_attention import AuxRequest

    batch, heads, n, _ = query.shape
    value = query.new_zeros(batch, key.shape[1], key.shape[2], 16)
    _, aux = flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                  enable_gqa=enable_gqa, return_aux=AuxRequest(lse=True))
    return aux.lse


def pagerank_importance_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor,
    start_weights: torch.Tensor,
    scale: float,
    temperature: float = 0.1,
    iterations: int = 5,
) -> torch.Tensor:
    """The same importance with FlexAttention: O(N) extra memory and fused kernels on GPU.

    Row normalisers are the log-sum-exp of the causal attention; each PageRank step is the
    log-sum-exp of the transposed problem (keys attend to the queries that see them), with
    log p_t - lse_row as a per-query bias: log p_{t+1}[j] = logsumexp_i(L_ij / T - lse_i + log p_t[i]).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    flex = flex_kernel(q.device.type)
    batch, heads, n, _ = q.shape
    qf, kf = q.float().contiguous(), k.float()
    scale = scale / temperature

    def causal_visible(b, h, query_index, key_index):
        return (key_index <= query_index) & key_mask[b, key_index]

    def seen_by_later(b, h, key_index_as_query, query_index_as_key):
        return (query_index_as_key >= key_index_as_query) & key_mask[b, key_index_as_query]

    rows = create_block_mask(causal_visible, batch, None, n, n, device=q.device)
    lse_rows = _log_sum_exp_rows(flex, qf, kf, rows, scale, enable_gqa=True)
    empty = torch.isinf(lse_rows)
    columns = create_block_mask(seen_by_later, batch, None, n, n, device=q.device)
    keys_as_queries = kf.repeat_interleave(heads // kf.shape[1], dim=1).contiguous()
    log_p = torch.log(start_weights.float())[:, None, :].expand(batch, heads, n)
    for _ in range(iterations):
        bias = torch.where(empty, torch.full_like(lse_rows, float("-inf")), log_p - lse_rows)

        def add_row_bias(score, b, h, query_index, key_index):
            return score + bias[b, h, key_index]

        log_p = _log_sum_exp_rows(flex, keys_as_queries, qf, columns, scale, score_mod=add_row_bias)
    return torch.exp(2 * log_p).mean(dim=1).sqrt()
