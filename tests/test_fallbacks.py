"""Every GPU-only optimisation has a runtime fallback with the same result: each failure is forced
here on the CPU (the launcher patched to raise, as a compile error, ptxas or a shared-memory limit
would) and the answer must equal the fallback's own, with one warning, the optimisation not tried
again in the process, and errors the fallback would meet too (out of memory, a wrong option)
still raised."""

import logging
import re

import pytest
import torch
from fake_cuda import FakeCuda

from aim_llava.capabilities import RUNTIME_FALLBACKS, DeviceCapabilities, RuntimeFallbacks
from aim_llava.errors import AimLlavaError
from aim_llava.model.image_processor import PinnedStaging
from aim_llava.model.language_model.generation import HostMirror
from aim_llava.reduction import attention_lse, importance, logsumexp
from aim_llava.reduction.importance import grouped_logits, log_importance, log_start_weights, pagerank_log_importance
from aim_llava.tensors import page_locked

H100 = DeviceCapabilities("cuda:0", "NVIDIA H100 80GB HBM3", 90, True, True, torch.__version__)


@pytest.fixture(autouse=True)
def no_failures_yet(monkeypatch):
    """Each test starts in a process where nothing has failed yet."""
    monkeypatch.setattr(RUNTIME_FALLBACKS, "failed", {})


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 40, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[0, :6] = False  # left padding
    return q, k, valid, log_start_weights(valid), 16**-0.5


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


class FailingLauncher:
    """A Triton kernel whose every launch raises what ptxas says when a launch does not fit."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*arguments, **options):
            self.launches += 1
            raise RuntimeError("PTXAS error: Internal Triton PTX codegen error\nptxas fatal: out of shared memory")

        return launch


def test_failing_fused_kernel_under_auto_falls_back_to_chunked_for_good(monkeypatch, caplog, inputs):
    """On an H100 ``auto`` picks the fused kernel; when its launch raises, the chunked kernel's
    answer comes back, now and on the next call, which does not launch the fused kernel again."""
    launcher = FailingLauncher()
    monkeypatch.setattr(importance, "device_capabilities", lambda device: H100)
    monkeypatch.setattr(attention_lse, "attention_lse_kernel", lambda: launcher)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the launcher run on CPU tensors
    q, k, valid, log_start, scale = inputs
    half_q, half_k = q.bfloat16(), k.bfloat16()
    expected = pagerank_log_importance(half_q, half_k, valid, log_start, scale)
    for _ in range(2):
        assert torch.equal(log_importance(half_q, half_k, valid, log_start, scale), expected)
    assert launcher.launches == 1
    (warning,) = warnings_of(caplog)
    assert warning.startswith("the fused importance kernel failed (RuntimeError: PTXAS error") and "chunked" in warning


def test_failing_flex_kernel_falls_back_to_chunked(monkeypatch, caplog, inputs):
    def compiled_flex(*arguments, **options):
        raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")

    monkeypatch.setattr(importance, "flex_kernel", lambda device_type: compiled_flex)
    monkeypatch.setattr(importance, "triangle_block_mask", lambda kind, n, device: None)  # 5 s on the CPU
    q, k, valid, log_start, scale = inputs
    expected = pagerank_log_importance(q, k, valid, log_start, scale)
    assert torch.equal(log_importance(q, k, valid, log_start, scale, kernel="flex"), expected)
    assert RUNTIME_FALLBACKS.failed == {"the flex importance kernel": "RuntimeError: out of resource: shared memory, "
                                                                      "Required: 262144, Hardware limit: 232448"}
    assert len(warnings_of(caplog)) == 1


def test_failing_float32_output_product_falls_back_to_float32_copies(monkeypatch, caplog, inputs):
    """Half-precision q k^T with float32 output (``torch.bmm(out_dtype=...)``, CUDA's tensor-core
    path) raising: the product of float32 copies, the same exact products."""
    bmm = torch.bmm
    calls = []

    def bmm_without_out_dtype(a, b, **options):
        calls.append(options)
        if "out_dtype" in options:
            raise NotImplementedError("Could not run 'aten::bmm.dtype' with arguments from this backend")
        return bmm(a, b)

    monkeypatch.setattr(importance, "half_products_in_float32", lambda a: True)
    monkeypatch.setattr(torch, "bmm", bmm_without_out_dtype)
    q, k = (x.bfloat16() for x in inputs[:2])
    grouped = q.reshape(2, 2, 2, 40, 16)
    expected = (q.float() @ k.float().repeat_interleave(2, dim=1).transpose(-1, -2))
    for _ in range(2):
        assert torch.equal(grouped_logits(grouped, k), expected)
    assert calls == [{"out_dtype": torch.float32}, {}, {}]  # tried once, then float32 copies only
    assert len(warnings_of(caplog)) == 1


def test_refused_pinned_memory_falls_back_to_ordinary_memory(monkeypatch, caplog):
    def refuse(tensor):
        raise RuntimeError("CUDA error: OS call failed or operation not supported on this OS")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    frames = torch.arange(12).view(3, 4)
    assert page_locked(frames) is frames and page_locked(frames) is frames
    (warning,) = warnings_of(caplog)
    assert warning.startswith("pinned host memory failed (RuntimeError: CUDA error") and "ordinary memory" in warning


def test_failing_log_sum_exp_kernel_falls_back_to_torch(monkeypatch, caplog):
    """The chunked kernel's one-pass Triton log-sum-exp raising: torch's logsumexp, for good."""
    launches = []

    def failing_kernel(x, dim, bias=None):
        launches.append(dim)
        raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory")

    monkeypatch.setattr(logsumexp, "use_triton", lambda x: True)
    monkeypatch.setattr(logsumexp, "logsumexp_triton", failing_kernel)
    x, rows = torch.randn(1, 2, 5, 7), torch.randn(1, 2, 5)
    for _ in range(2):
        assert torch.equal(logsumexp.logsumexp_with_bias(x, -2, rows), torch.logsumexp(x + rows[..., None], dim=-2))
    assert launches == [-2]
    (warning,) = warnings_of(caplog)
    assert warning.startswith("the Triton log-sum-exp kernel failed (RuntimeError: triton") and "torch." in warning


def test_refused_pinned_memory_leaves_the_decoding_mirror_and_frame_staging_working(monkeypatch, caplog):
    """HostMirror's token copies and PinnedStaging's buffer come from ordinary memory when pinning
    is refused: the same tokens and bytes arrive, after one warning."""
    FakeCuda(monkeypatch)

    def refuse(tensor):
        raise RuntimeError("CUDA error: OS call failed or operation not supported on this OS")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    mirror = HostMirror(batch=2, steps=2, device=torch.device("cuda:0"))
    for step in range(2):
        mirror.push(step, torch.tensor([step, 7]), torch.tensor(step == 1))
    assert mirror.deliver(1) == 1 and mirror.tokens.tolist() == [[0, 7], [1, 7]]
    host = torch.randint(0, 256, (700, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(PinnedStaging(nbytes=1000).to_device(host, torch.device("cpu")), host)
    (warning,) = warnings_of(caplog)
    assert warning.startswith("pinned host memory failed") and "ordinary memory" in warning


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   AimLlavaError("importance_kernel 'fused' needs a CUDA device with Triton")])
def test_errors_the_fallback_would_meet_too_are_raised(error):
    """Out of memory (the fallback needs more) and the package's own errors (a wrong option) are
    the caller's: raised, and the optimisation is not written off."""
    fallbacks = RuntimeFallbacks()

    def fast():
        raise error

    with pytest.raises(type(error)):
        fallbacks.run("the fused importance kernel", fast, lambda: "chunked", "the chunked kernel")
    assert fallbacks.failed == {}


DEVICE_FAILURES = [torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
                   RuntimeError("Triton Error [CUDA]: device-side assert triggered"),
                   RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED ... unspecified launch failure")]


@pytest.mark.parametrize("error", DEVICE_FAILURES, ids=lambda error: str(error)[:40])
def test_a_failing_device_is_not_a_fallback(error, monkeypatch, caplog):
    """A sticky CUDA error surfacing in pinning (or in a kernel launch) says the GPU failed, not
    that pinning is refused: it propagates, nothing is written off and no warning blames the
    optimisation (the safe path would fail alike, and every later call too)."""
    def fail(tensor):
        raise error

    monkeypatch.setattr(torch.Tensor, "pin_memory", fail)
    with pytest.raises(type(error), match=re.escape(str(error))):
        page_locked(torch.zeros(3))
    with pytest.raises(type(error)):
        RUNTIME_FALLBACKS.run("the fused importance kernel", lambda: fail(None), lambda: "chunked", "chunked")
    assert RUNTIME_FALLBACKS.failed == {} and warnings_of(caplog) == []


def test_a_refusal_that_leaves_the_device_usable_is_still_a_fallback(monkeypatch, caplog):
    """Pinned memory the system will not give (an AcceleratorError too, in torch 2.8 and later)
    keeps falling back to ordinary memory."""
    def refuse(tensor):
        raise torch.AcceleratorError("CUDA error: out of memory")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    frames = torch.zeros(3)
    assert page_locked(frames) is frames
    assert list(RUNTIME_FALLBACKS.failed) == ["pinned host memory"] and len(warnings_of(caplog)) == 1
