"""Compile this package's Triton kernels for a CUDA GPU on a machine that has none.

Triton ships its own ``ptxas`` and ``cuobjdump``, so a launch can be compiled down to a cubin for
any NVIDIA architecture without a driver. The launch's arguments are built by the kernel module
itself (``launch_arguments``) from tensors on the ``meta`` device, and specialised by Triton's own
argument binder (alignment, strides of 1, divisibility by 16), so what is compiled is what a real
launch of those shapes would compile. What comes back is static: whether it compiles, its
registers, shared and spilled (local) memory, and which matrix-multiply instructions it uses
(``wgmma``/``mma`` run on tensor cores; none means the products run on the ordinary cores). No
speed is measured here.

Uses Triton internals (``create_function_from_signature``, ``JITFunction._pack_args``), checked
with Triton 3.6 (torch 2.11, the GPU machine's) and 3.8.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

from aim_llava.errors import AimLlavaError
from aim_llava.reduction import attention_lse, logsumexp

# per compute capability (70: V100, 75: T4, 80: A100, 86/89: RTX 30xx/40xx, L4, L40, 90: H100/H200)
SHARED_MEMORY_PER_BLOCK = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024,
                           90: 227 * 1024}  # opt-in maxima, bytes
REGISTERS_PER_SM = 65536
WARPS_PER_SM = {70: 64, 75: 32, 80: 64, 86: 48, 89: 48, 90: 64}
SHARED_MEMORY_PER_SM = {70: 96 * 1024, 75: 64 * 1024, 80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024,
                        90: 228 * 1024}
MATRIX_INSTRUCTION = re.compile(r"\b(wgmma\.mma_async\.[\w.]+|mma\.sync\.[\w.]+)")
RESOURCE_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass(frozen=True)
class KernelResources:
    """What one compiled launch needs on the GPU, per program (thread block)."""

    registers: int  # per thread
    shared_bytes: int  # what Triton checks against the GPU's per-block maximum at load time
    local_bytes: int  # per thread: registers spilled to local memory (and stack)
    num_warps: int
    matrix_instructions: tuple[str, ...]  # distinct wgmma/mma forms in the PTX; empty: no tensor cores

    def resident_programs(self, capability: int) -> int:
        """Programs one SM can hold at once, from registers, shared memory and warps (an upper
        bound: register allocation granularity is ignored)."""
        threads = 32 * self.num_warps
        by_registers = REGISTERS_PER_SM // max(1, self.registers * threads)
        by_shared = SHARED_MEMORY_PER_SM[capability] // self.shared_bytes if self.shared_bytes else by_registers
        return min(by_registers, by_shared, WARPS_PER_SM[capability] // self.num_warps)

    def fits(self, capability: int) -> bool:
        """Whether a program's shared memory is within what one block may have on that GPU."""
        return self.shared_bytes <= SHARED_MEMORY_PER_BLOCK[capability]


def meta_like(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor on the ``meta`` device: shapes and strides, no memory."""
    return torch.empty(shape, dtype=dtype, device="meta")


def compile_for_target(kernel, arguments: tuple, options: dict, capability: int = 90) -> KernelResources:
    """Compile one launch of the ``@triton.jit`` function ``kernel`` (``arguments`` positional,
    ``options`` its constexprs plus num_warps/num_stages) for ``sm_<capability>``."""
    import triton
    from triton.compiler import ASTSource

    target, backend, options, (bound, specialization, parsed) = _bind(kernel, arguments, options, capability)
    parsed, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, parsed)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=parsed.__dict__)
    usage = _resource_usage(compiled.asm["cubin"])
    return KernelResources(
        registers=usage["REG"],
        shared_bytes=compiled.metadata.shared,
        local_bytes=usage["LOCAL"] + usage["STACK"],
        num_warps=parsed.num_warps,
        matrix_instructions=tuple(sorted(set(MATRIX_INSTRUCTION.findall(compiled.asm["ptx"])))),
    )


def _bind(kernel, arguments: tuple, options: dict, capability: int):
    """Triton's argument binder for ``sm_<capability>`` applied to one launch: (target, backend,
    options, (bound arguments, specialisation, parsed options))."""
    if capability not in SHARED_MEMORY_PER_BLOCK:
        raise AimLlavaError(f"unknown CUDA capability {capability}: use one of {sorted(SHARED_MEMORY_PER_BLOCK)}")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    options = dict(options, debug=False)
    return target, backend, options, binder(*arguments, **options)


def specialization(launch: Launch, capability: int = 90) -> tuple:
    """How Triton specialises ``launch`` on ``sm_<capability>`` (pointer alignment, integers and
    strides equal to 1 or divisible by 16): launches with equal specialisations share one compiled
    kernel, others compile their own on first use."""
    return tuple(_bind(launch.kernel, launch.arguments, launch.options, capability)[3][1])


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack, (static) shared and local memory of the cubin's one function, from
    ``cuobjdump``."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True,
                                check=True).stdout
    match = RESOURCE_USAGE.search(report)
    if match is None:
        raise AimLlavaError(f"cuobjdump printed no resource usage: {report.strip()[:200]}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, match.groups())))


@dataclass(frozen=True)
class Launch:
    """One kernel launch to compile: a name for the table, the ``@triton.jit`` function, and what
    the kernel module's ``launch_arguments`` returns for it."""

    name: str
    kernel: object
    arguments: tuple
    options: dict


def fused_importance_launches(dtype: torch.dtype, tiling: attention_lse.Tiling, n: int = 6373, heads: int = 28,
                              kv_heads: int = 4, dim: int = 128) -> list[Launch]:
    """The fused kernel's two passes as ``pagerank_log_importance_fused`` launches them (row
    normalisers with the queries outside, PageRank steps with the keys outside), at one shape
    (default: 7B's heads and a 32-frame aim_default prefill's length)."""
    return fused_importance_launches_of(meta_like((1, heads, n, dim), dtype), meta_like((1, kv_heads, n, dim), dtype),
                                        tiling)


def fused_importance_launches_of(q: torch.Tensor, k: torch.Tensor, tiling: attention_lse.Tiling) -> list[Launch]:
    """The fused kernel's two passes over q [B, heads, N, d] and k [B, kv_heads, N, d] as given
    (their strides included; ``meta`` tensors are enough)."""
    batch, heads, n, _ = q.shape
    per_token = torch.empty(batch, n, device=q.device)
    per_head = torch.empty(batch, heads, n, device=q.device)
    kernel = attention_lse.attention_lse_kernel()
    rows = attention_lse.launch_arguments(q, k, heads, 1.0, per_token, per_token, per_head, True, tiling)[:2]
    columns = attention_lse.launch_arguments(k, q, heads, 1.0, per_head, per_token, per_head, False, tiling)[:2]
    return [Launch(f"fused rows {tiling}", kernel, *rows), Launch(f"fused columns {tiling}", kernel, *columns)]


def logsumexp_launches(n: int = 6373, heads: int = 28) -> list[Launch]:
    """The chunked kernel's float32 log-sum-exp over its cached logits: along rows (the row
    normalisers) and, with a bias, along columns (a PageRank step)."""
    logits, per_head = meta_like((1, heads, n, n), torch.float32), meta_like((1, heads, n), torch.float32)
    out = meta_like((heads, n), torch.float32)
    return [Launch(name, logsumexp.triton_kernel(), *logsumexp.launch_arguments(logits, dim, bias, out)[:2])
            for name, dim, bias in (("logsumexp rows", -1, None), ("logsumexp columns", -2, per_head))]
