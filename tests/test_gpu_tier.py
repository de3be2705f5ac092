"""Without CUDA, the GPU tier (tests/gpu) is reported as skipped with its reason, not left out of
the run without a word."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, tests/gpu runs for real")
def test_gpu_tier_is_reported_as_skipped_without_cuda():
    result = subprocess.run([sys.executable, "-m", "pytest", str(TESTS / "gpu"), "-q", "-rs", "-p", "no:cacheprovider"],
                            capture_output=True, text=True, timeout=300, cwd=TESTS.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.fullmatch(r"\d+ skipped in .*", result.stdout.strip().splitlines()[-1]), result.stdout[-3000:]
    assert "GPU tier: needs CUDA" in result.stdout
    modules = sorted((TESTS / "gpu").glob("test_*.py"))
    assert modules and all(f"tests/gpu/{module.name}" in result.stdout for module in modules)  # all collected
