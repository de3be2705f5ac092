"""The importance kernels compiled for NVIDIA GPUs on this GPU-less machine (Triton's own ptxas and
cuobjdump): they compile, their products run on tensor cores in half precision, they do not spill
registers, and their shared memory fits a block. Static facts, checked where no GPU can run them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")  # installed with torch on Linux x86-64, where CI runs

from aim_llava.capabilities import FUSED_IMPORTANCE_CAPABILITIES  # noqa: E402
from aim_llava.offline_compile import (  # noqa: E402
    KernelResources,
    compile_for_target,
    fused_importance_launches,
    logsumexp_launches,
)
from aim_llava.reduction.attention_lse import Tiling  # noqa: E402


def test_compile_kernels_script_for_h100(tmp_path):
    """scripts/compile_kernels.py with the default launch shape, bf16 and fp16, for sm_90
    (H100/H200): Hopper's warpgroup MMA on the model's dtype with float32 accumulation, nothing
    spilled, within the shared memory."""
    script = Path(__file__).parents[1] / "scripts" / "compile_kernels.py"
    report = tmp_path / "kernels.json"
    result = subprocess.run([sys.executable, str(script), "--capability", "90", "--dtypes", "bfloat16,float16",
                             "--json", str(report)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.count("| fused ") == 4
    launches = json.loads(report.read_text())["launches"]
    assert len(launches) == 2 * 2 + 2  # two passes per dtype, then the chunked kernel's two reductions
    for launch in launches:
        assert "error" not in launch, launch
        assert launch["local_bytes"] == 0 and launch["fits"], launch
        if launch["launch"].startswith("fused"):
            operand = {"bfloat16": ".bf16.bf16", "float16": ".f16.f16"}[launch["dtype"]]
            (instruction,) = launch["matrix_instructions"]
            assert instruction.startswith("wgmma.mma_async") and instruction.endswith(f".f32{operand}"), launch
        else:
            assert launch["matrix_instructions"] == []  # a memory-bound reduction: no products


@pytest.mark.parametrize("capability", sorted(FUSED_IMPORTANCE_CAPABILITIES - {90}))
def test_fused_kernel_for_ampere_and_ada_uses_mma(capability):
    """On sm_80 (A100), sm_86 and sm_89 (RTX 30xx/40xx, L4, L40), where ``auto`` picks it, the same
    source compiles to the warp-level mma instruction instead, without spilling."""
    rows, _ = fused_importance_launches(torch.bfloat16, Tiling())
    resources = compile_for_target(rows.kernel, rows.arguments, rows.options, capability)
    assert [name.split(".")[:2] for name in resources.matrix_instructions] == [["mma", "sync"]]
    assert ".bf16.bf16." in resources.matrix_instructions[0]
    assert resources.local_bytes == 0 and resources.fits(capability)


@pytest.mark.parametrize("capability", [75, 70])
def test_fused_kernel_for_turing_and_volta_has_no_tensor_cores(capability):
    """On sm_75 (T4) and sm_70 (V100) the fused kernel compiles in float16 (their half precision)
    but without any matrix instruction and with registers spilled: ``auto`` does not pick it
    there. The chunked kernel's log-sum-exp, which ``auto`` runs instead, compiles cleanly."""
    assert capability not in FUSED_IMPORTANCE_CAPABILITIES
    rows, _ = fused_importance_launches(torch.float16, Tiling())
    fused = compile_for_target(rows.kernel, rows.arguments, rows.options, capability)
    assert fused.matrix_instructions == () and fused.local_bytes > 0 and fused.fits(capability)
    for launch in logsumexp_launches():
        chunked = compile_for_target(launch.kernel, launch.arguments, launch.options, capability)
        assert chunked.local_bytes == 0 and chunked.fits(capability)


def test_float32_fused_kernel_keeps_ieee_products():
    """Float32 q and k are multiplied in IEEE float32 (the reference's precision), not in TF32 on
    tensor cores; a lost IEEE flag would show up as an mma/wgmma instruction here."""
    rows, columns = fused_importance_launches(torch.float32, Tiling(), n=1769)
    for launch in (rows, columns):
        assert compile_for_target(launch.kernel, launch.arguments, launch.options, 90).matrix_instructions == ()


def test_launches_follow_the_kernel_modules_arguments():
    """The rows pass puts the queries outside (28 heads, groups of 1) and the keys inside (4 heads,
    groups of 7); the columns pass the reverse; the log-sum-exp reduces rows, then columns."""
    rows, columns = fused_importance_launches(torch.bfloat16, Tiling(), n=100, heads=28, kv_heads=4, dim=128)
    assert rows.options["OUTER_IS_QUERY"] and not columns.options["OUTER_IS_QUERY"]
    assert rows.arguments[0].shape == (1, 28, 100, 128) and rows.arguments[1].shape == (1, 4, 100, 128)
    assert rows.arguments[7:9] == (1, 7) and columns.arguments[7:9] == (7, 1)
    assert rows.options["BLOCK_DIM"] == 128
    assert [launch.options["HAS_BIAS"] for launch in logsumexp_launches(n=100)] == [False, True]


def test_resident_programs_and_fit():
    """Programs per SM are limited by registers, shared memory and warps, whichever is least."""
    by_registers = KernelResources(registers=128, shared_bytes=16 * 1024, local_bytes=0, num_warps=4,
                                   matrix_instructions=())
    assert by_registers.resident_programs(90) == 65536 // (128 * 128)  # 4 (shared would allow 14)
    by_shared = KernelResources(registers=32, shared_bytes=100 * 1024, local_bytes=0, num_warps=4,
                                matrix_instructions=())
    assert by_shared.resident_programs(90) == 2 and by_shared.resident_programs(80) == 1
    by_warps = KernelResources(registers=16, shared_bytes=0, local_bytes=0, num_warps=8, matrix_instructions=())
    assert by_warps.resident_programs(90) == 64 // 8
    too_big = KernelResources(registers=64, shared_bytes=200 * 1024, local_bytes=0, num_warps=4,
                              matrix_instructions=())
    assert too_big.fits(90) and not too_big.fits(80)
