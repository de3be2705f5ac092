"""What the device a model runs on can do, and what to do when a GPU optimisation fails there.

:class:`DeviceCapabilities` (compute capability, bfloat16 in hardware, Triton present, torch
version) is read once per device and decides the defaults that depend on it: the dtype that
``dtype="auto"`` loads a model in (:meth:`DeviceCapabilities.auto_dtype`) and the PageRank
importance kernel that ``importance_kernel="auto"`` runs (:meth:`DeviceCapabilities.importance_kernel`).

:data:`RUNTIME_FALLBACKS` keeps, for the life of the process, the GPU-only optimisations that
raised here (a Triton kernel that does not compile for this GPU, a ``ptxas`` or shared-memory
failure, an operator this build lacks, pinned memory refused by the system): each is replaced by
a path that computes the same result, with one warning, instead of failing every request. It is
process-wide on purpose: a kernel that cannot compile on this GPU will not compile on the next
call either. A failure of the device itself (:func:`is_device_failure`: an illegal memory access,
a device-side assert, ...) is never taken for one: it leaves the process's CUDA context unusable,
so it propagates, and so does running out of memory.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from aim_llava.errors import AimLlavaError, DeviceFailure, DeviceMemoryError

logger = logging.getLogger(__name__)

# Compute capabilities for which the fused importance kernel (aim_llava/reduction/attention_lse.py)
# is known to compile to tensor-core instructions without spilling registers, in bf16 and fp16
# (scripts/compile_kernels.py, tests/test_offline_compile.py). On sm_75 (T4) and sm_70 (V100) it
# compiles but without any matrix instruction, spilling registers to local memory: excluded, as is
# every capability not checked.
FUSED_IMPORTANCE_CAPABILITIES = frozenset({80, 86, 89, 90})
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DeviceCapabilities:
    """What one device offers the defaults that depend on it."""

    device: str  # "cpu", "cuda:0", ...
    name: str  # the GPU's name, or the CPU's bfloat16 instructions
    compute_capability: int | None  # 10 * major + minor (90: H100/H200, 75: T4); None off CUDA
    bfloat16: bool  # bfloat16 arithmetic in hardware (sm_80 and later; AMX or AVX512-BF16 on a CPU)
    triton: bool
    torch_version: str

    def auto_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        """The dtype ``dtype="auto"`` means here: on a CPU bfloat16 where it computes bfloat16 in
        hardware (about 3x faster than float32 there), float32 otherwise (emulated bfloat16 is
        far slower); on a GPU the checkpoint's dtype, with float16 in place of bfloat16 where the
        GPU has no bfloat16 (T4, V100)."""
        if self.compute_capability is None:
            return torch.bfloat16 if self.bfloat16 else torch.float32
        if checkpoint_dtype == torch.bfloat16 and not self.bfloat16:
            return torch.float16
        return checkpoint_dtype

    def importance_kernel(self, dtype: torch.dtype) -> str:
        """The PageRank importance kernel ``auto`` means for q and k of ``dtype`` here (see
        :mod:`aim_llava.reduction.importance`): ``factored`` off CUDA; ``fused`` for half precision
        where it is known to compile well (:data:`FUSED_IMPORTANCE_CAPABILITIES`) and Triton is
        installed; ``chunked`` for float32 and everywhere else."""
        if self.compute_capability is None:
            return "factored"
        fused = self.triton and self.compute_capability in FUSED_IMPORTANCE_CAPABILITIES
        return "fused" if fused and dtype in HALF_DTYPES else "chunked"

    def describe(self) -> str:
        if self.compute_capability is None:
            return f"{self.device} ({self.name})"
        return f"{self.device} ({self.name}, sm_{self.compute_capability})"


def cpu_bfloat16_instructions() -> list[str]:
    """The bfloat16 matrix instructions this CPU has, as torch detects them (AMX, AVX512-BF16)."""
    found = {"AMX": torch.cpu._is_amx_tile_supported(), "AVX512-BF16": torch.cpu._is_avx512_bf16_supported()}
    return [name for name, present in found.items() if present]


@functools.cache
def device_capabilities(device: str) -> DeviceCapabilities:
    """The capabilities of ``device`` ("cpu", "cuda", "cuda:1", ...), read once per device."""
    where = torch.device(device)
    triton = importlib.util.find_spec("triton") is not None
    if where.type != "cuda":
        instructions = cpu_bfloat16_instructions() if where.type == "cpu" else []
        name = ", ".join(instructions) or "no bfloat16 instructions"
        return DeviceCapabilities(str(where), name, None, bool(instructions), triton, torch.__version__)
    index = where.index if where.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return DeviceCapabilities(f"cuda:{index}", torch.cuda.get_device_name(index), 10 * major + minor, major >= 8,
                              triton, torch.__version__)


def auto_dtype(device: torch.device, checkpoint_dtype: torch.dtype, say: bool = True) -> torch.dtype:
    """What ``dtype="auto"`` loads a model in on ``device`` (:meth:`DeviceCapabilities.auto_dtype`),
    said in the log (the command line shows it) unless ``say`` is False (a question asked before
    loading)."""
    capabilities = device_capabilities(str(device))
    dtype = capabilities.auto_dtype(checkpoint_dtype)
    if say:
        logger.info("dtype auto on %s: %s", capabilities.describe(), str(dtype).removeprefix("torch."))
    return dtype


# What CUDA says (through torch, Triton or cuBLAS) when a kernel has failed on the device: the
# "sticky" errors after which every later CUDA call of the process fails too. A refusal that leaves
# the device usable (pinned memory the system will not give, a kernel image this GPU lacks, too
# many resources for one launch) is not among them: a fallback can run after it.
DEVICE_FAILURES = (
    "illegal memory access", "illegal instruction", "misaligned address", "device-side assert",
    "unspecified launch failure", "hardware stack error", "uncorrectable ECC error", "launch timed out",
    "invalid program counter", "CUDA error: unknown error", "context is destroyed",
)


def is_device_failure(error: BaseException) -> bool:
    """Whether ``error`` says the GPU failed (a sticky CUDA error, :data:`DEVICE_FAILURES`): no
    other path can run on that device in this process."""
    if not isinstance(error, RuntimeError) or isinstance(error, torch.OutOfMemoryError):
        return False
    text = str(error)
    return any(failure.lower() in text.lower() for failure in DEVICE_FAILURES)


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters of it)."""
    line = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {line}"


def device_failure(error: BaseException) -> DeviceFailure:
    """The one-line error that a failure of the device (:func:`is_device_failure`) becomes."""
    return DeviceFailure(f"the GPU failed ({first_line(error)}): nothing more can run on it in this process; "
                         "restart it (with CUDA_LAUNCH_BLOCKING=1 the error names the failing kernel)")


def out_of_memory(error: torch.OutOfMemoryError, freed_bytes: int) -> DeviceMemoryError:
    """The one-line error of a request that ran out of device memory even after ``freed_bytes``
    were given back: how much it needed (as torch's message says) and what to do."""
    text = str(error)
    needed = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    free = re.search(r"total capacity of ([\d.]+ [KMGT]?i?B) of which ([\d.]+ [KMGT]?i?B) is free", text)
    what = f"it needed {needed.group(1)} more" if needed else first_line(error)
    if free:
        what += f", with {free.group(2)} free of {free.group(1)}"
    if freed_bytes:
        what += f", after the reuse cache gave back {freed_bytes / 2**20:.0f} MiB"
    return DeviceMemoryError(f"out of device memory for this request ({what}): ask with fewer frames, a reduction "
                             "that keeps fewer tokens (e.g. aim_default), a smaller batch or a smaller --cache-mb")


Result = TypeVar("Result")


class RuntimeFallbacks:
    """The GPU optimisations that failed in this process, by name, with the first error's line.

    :meth:`run` tries an optimisation unless it failed before; when it raises, the optimisation
    is recorded as failed, one warning says what takes its place, and the safe path computes the
    result, now and for the rest of the process. Errors that the safe path would meet as well,
    or that are the caller's to fix, are not caught: running out of device memory, a failure of
    the device itself (:func:`is_device_failure`), and this package's own errors (an option that
    cannot work on this device)."""

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}

    def run(self, name: str, fast: Callable[[], Result], safe: Callable[[], Result], instead: str) -> Result:
        """``fast()``, or ``safe()`` once ``fast`` has raised (now or before); ``name`` and
        ``instead`` describe both for the warning."""
        if name in self.failed:
            return safe()
        try:
            return fast()
        except (torch.OutOfMemoryError, AimLlavaError):
            raise
        except Exception as error:  # a compile error, ptxas, shared memory, a missing operator, ...
            if is_device_failure(error):
                raise
            self.record(name, error, instead)
        return safe()

    def record(self, name: str, error: BaseException, instead: str) -> None:
        """Write ``name`` off for the rest of the process because of ``error``, with the one
        warning that says what takes its place (for optimisations that fail outside :meth:`run`)."""
        self.failed[name] = first_line(error)
        logger.warning("%s failed (%s); %s takes its place for the rest of this process", name, self.failed[name],
                       instead)


RUNTIME_FALLBACKS = RuntimeFallbacks()
