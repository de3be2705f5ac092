"""The server's warm-up compiles the importance kernels' specialisation that requests use: Triton
compiles one kernel per specialisation of a launch's arguments (integers and strides divisible by
16 or not, pointers aligned), decided here by Triton's own argument binder on ``meta`` tensors, for
the fused kernel's passes and the chunked kernel's log-sum-exp, at 7B's head shapes."""

import pytest
import torch

pytest.importorskip("triton")  # installed with torch on Linux x86-64, where CI runs

from aim_llava.architectures import architecture  # noqa: E402
from aim_llava.offline_compile import fused_importance_launches_of, logsumexp_launches, specialization  # noqa: E402
from aim_llava.reduction.attention_lse import Tiling  # noqa: E402
from aim_llava.server.batching import WARM_UP_IMPORTANCE_TOKENS, importance_warm_up_inputs  # noqa: E402

TEXT = architecture("llava-onevision-qwen2-7b").text
REQUEST_LENGTHS = (1769, 6373, 9609)  # 32-frame aim_default, 32-frame baseline, 192-frame aim_default prefills


def request_qk(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of a prefill of ``n`` tokens as the decoder's attention lays them out: projected
    to [1, n, heads, d], heads moved in front by a transpose."""
    q = torch.empty(1, n, TEXT.num_attention_heads, TEXT.head_dim, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, n, TEXT.num_key_value_heads, TEXT.head_dim, dtype=torch.bfloat16, device="meta")
    return q.transpose(1, 2), k.transpose(1, 2)


def specialisations(q: torch.Tensor, k: torch.Tensor) -> list[tuple]:
    launches = fused_importance_launches_of(q, k, Tiling()) + logsumexp_launches(q.shape[2], q.shape[1])
    return [specialization(launch) for launch in launches]


@pytest.mark.parametrize("n", REQUEST_LENGTHS)
def test_the_warm_up_compiles_what_requests_use(n):
    q, k, valid, log_start = importance_warm_up_inputs(TEXT, "meta", torch.bfloat16)
    assert q.shape == (1, TEXT.num_attention_heads, WARM_UP_IMPORTANCE_TOKENS, TEXT.head_dim)
    assert valid.shape == log_start.shape == (1, WARM_UP_IMPORTANCE_TOKENS)
    assert specialisations(q, k) == specialisations(*request_qk(n))


def test_a_length_divisible_by_16_is_another_kernel():
    """What the warm-up used to run (64 tokens) specialises differently from every request above."""
    assert all(specialisations(*request_qk(64)) != specialisations(*request_qk(n)) for n in REQUEST_LENGTHS)
