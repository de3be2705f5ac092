"""Token importance from a layer's attention, computed in query chunks (no [heads, N, N] matrix).

PageRank importance (SPEC section 3): with M = softmax((QK^T / sqrt(d) + causal mask) / T) over
keys, p_0 the given start weights (1/N each in the published method) and p_{t+1} = p_t @ M,
the importance of token j is sqrt(mean over heads of p_n[j]^2).

Each application of M is done a chunk of query rows at a time, so the extra memory is
O(chunk x N) per head; the row normalisers (log-sum-exp) are computed in a first pass. When the
whole matrix fits the memory budget it is computed once and reused by all iterations.
"""

from __future__ import annotations

import torch

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for one chunk of float32 attention rows


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
        logits = (q_grouped[:, :, :, start:end] @ k_t) * scale
        causal = key_index[None, :] <= torch.arange(start, end, device=q.device)[:, None]
        allowed = causal[None] & key_mask[:, None, :]
        logits = logits.reshape(batch, heads, end - start, n).masked_fill(~allowed[:, None], float("-inf"))
        yield start, end, logits


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
) -> torch.Tensor:
    """Importance [B, N] (float32) of every token.

    q [B, H, N, d] and k [B, H_kv, N, d] are the layer's rotated queries and keys; key_mask [B, N]
    says which tokens may be attended (besides causality); start_weights [B, N] is p_0. Rows
    that can attend to nothing contribute nothing.
    """
    batch, heads, n, _ = q.shape
    chunk = chunk_size or max(1, memory_budget // max(1, batch * heads * n * 4))
    scale = scale / temperature
    lse_parts, cached = [], []
    reuse = chunk >= n
    for start, end, logits in attention_logit_chunks(q, k, key_mask, scale, chunk):
        lse = torch.logsumexp(logits, dim=-1)
        lse_parts.append(torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
        if reuse:
            cached.append((start, end, torch.exp(logits - lse_parts[-1][..., None])))
    lse = torch.cat(lse_parts, dim=-1)
    p = start_weights.float()[:, None, :].expand(batch, heads, n)
    for _ in range(iterations):
        nxt = torch.zeros(batch, heads, n, device=q.device, dtype=torch.float32)
        if reuse:
            blocks = cached
        else:
            blocks = (
                (start, end, torch.exp(logits - lse[..., start:end, None]))
                for start, end, logits in attention_logit_chunks(q, k, key_mask, scale, chunk)
            )
        for start, end, probs in blocks:
            nxt += (p[..., None, start:end] @ probs).squeeze(-2)
        p = nxt
    return p.pow(2).mean(dim=1).sqrt()
