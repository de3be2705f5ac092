"""Attention kernels: eager, PyTorch SDPA, and FlashAttention-2 when it is installed.

All take ``q`` of shape [B, heads, Lq, d] and ``k``/``v`` of shape [B, kv_heads, Lk, d] (grouped
query attention when kv_heads < heads) and an optional boolean ``mask`` of shape
[B, 1, Lq, Lk] (True = may attend). ``causal`` with no mask means the usual lower-triangular
pattern with Lq == Lk, or no restriction when Lq == 1 (one decoding step over a cache).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from aim_llava.errors import AimLlavaError

logger = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(name: str | None) -> str:
    """Validate a backend name; ``flash_attention_2`` falls back to sdpa (logged) if missing."""
    name = name or "sdpa"
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise AimLlavaError(
            f"unknown attn_implementation {name!r}; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if name == "flash_attention_2" and not flash_attn_available():
        logger.warning("flash_attn is not installed (pip install '.[flash]'); using sdpa instead")
        return "sdpa"
    return name


def _causal_mask(lq: int, lk: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned lower triangle: query i sits at key index lk - lq + i."""
    q_idx = torch.arange(lk - lq, lk, device=device)[:, None]
    k_idx = torch.arange(lk, device=device)[None, :]
    return k_idx <= q_idx


def expand_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, kv_heads, L, d] -> [B, heads, L, d]: query head h reads key/value head h // (heads / kv_heads).
    ``x`` itself when there are as many heads (a folded decoding step): no copy of the cache."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def eager_attention(q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is None and causal and q.shape[2] > 1:
        mask = _causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
    is_causal = mask is None and causal and q.shape[2] > 1
    if is_causal and q.shape[2] != k.shape[2]:
        mask, is_causal = _causal_mask(q.shape[2], k.shape[2], q.device), False
    grouped = q.shape[1] != k.shape[1]
    if grouped and mask is not None:
        backend = grouped_mask_backend(q, k, v, mask)
        if backend is not None:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        # SDPA would fall back to its math kernel and hold the whole score matrix: shared key/value
        # heads are expanded instead (O(L) extra memory)
        k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
        grouped = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=grouped)


def grouped_mask_backend(q, k, v, mask) -> SDPBackend | None:
    """A fused SDPA kernel that takes these grouped key/value heads together with the mask, or None.

    On CUDA the flash kernel takes no mask and, depending on the torch version, the
    memory-efficient one no grouped heads; cuDNN's may take both (a review of torch 2.11 says it
    does; torch's own checks decide here), but SDPA ranks its math kernel before cuDNN, so the
    kernel is named explicitly. None on other devices (grouped heads are then expanded)."""
    if not q.is_cuda:
        return None
    params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, False, True)
    checks = ((SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.can_use_efficient_attention),
              (SDPBackend.CUDNN_ATTENTION, getattr(torch.backends.cuda, "can_use_cudnn_attention", None)))
    return next((backend for backend, usable in checks if usable is not None and usable(params)), None)


def flash_attention(q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
    if mask is not None or q.dtype not in (torch.float16, torch.bfloat16):
        # flash-attn takes neither padding masks in this form nor float32: sdpa covers those calls.
        return sdpa_attention(q, k, v, mask, causal, scale)
    from flash_attn import flash_attn_func

    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal
    )
    return out.transpose(1, 2)


KERNELS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash_attention_2": flash_attention}


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    implementation: str,
) -> torch.Tensor:
    """Run attention with the named kernel; returns [B, heads, Lq, d].

    A single query per sample over grouped key/value heads (a decoding step) is folded into an
    ungrouped call: the query heads that share a key/value head become that head's queries
    ([B, kv_heads, groups, d]), which every kernel runs without copying the cache per head.
    """
    batch, heads, q_len, dim = q.shape
    kv_heads = k.shape[1]
    if q_len == 1 and heads != kv_heads:
        folded = q.reshape(batch, kv_heads, heads // kv_heads, dim)
        out = KERNELS[implementation](folded, k, v, mask, False, scale)
        return out.reshape(batch, heads, 1, dim)
    return KERNELS[implementation](q, k, v, mask, causal, scale)
