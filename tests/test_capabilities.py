"""The defaults that depend on the device, decided once per device from its capabilities: the dtype
``auto`` loads a model in (CPU: bfloat16 only with bfloat16 instructions; GPU: float16 where it has
no bfloat16) and the importance kernel ``auto`` runs (the fused kernel only where it is known to
compile to tensor-core code). The CPU's and GPU's capabilities are faked both ways."""

import logging

import pytest
import torch

from aim_llava.architectures import architecture
from aim_llava.capabilities import FUSED_IMPORTANCE_CAPABILITIES, DeviceCapabilities, device_capabilities
from aim_llava.model.builder import resolve_dtype
from aim_llava.reduction.importance import auto_kernel

CONFIG = architecture("llava-onevision-qwen2-0.5b")  # no dtype given: a bfloat16 checkpoint assumed


@pytest.fixture(autouse=True)
def fresh_capabilities():
    """Capabilities are cached per device: each test reads its faked ones afresh."""
    device_capabilities.cache_clear()
    yield
    device_capabilities.cache_clear()


def fake_cpu(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


def fake_gpu(monkeypatch, capability: tuple[int, int], name: str) -> list:
    """torch.cuda answering for one GPU; returns the list of devices whose capability was asked."""
    asked = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: name)
    return asked


@pytest.mark.parametrize("amx, avx512_bf16, expected, described", [
    (True, True, torch.bfloat16, "cpu (AMX, AVX512-BF16): bfloat16"),
    (False, True, torch.bfloat16, "cpu (AVX512-BF16): bfloat16"),
    (False, False, torch.float32, "cpu (no bfloat16 instructions): float32"),
])
def test_cpu_auto_dtype_follows_its_bfloat16_instructions(monkeypatch, caplog, amx, avx512_bf16, expected, described):
    fake_cpu(monkeypatch, amx, avx512_bf16)
    with caplog.at_level(logging.INFO, logger="aim_llava.capabilities"):
        assert resolve_dtype("auto", CONFIG, torch.device("cpu")) == expected
    assert [record.getMessage() for record in caplog.records] == [f"dtype auto on {described}"]
    assert resolve_dtype("float32", CONFIG, torch.device("cpu")) == torch.float32  # asked for: kept


@pytest.mark.parametrize("capability, name, expected", [
    ((7, 0), "Tesla V100-SXM2-32GB", torch.float16),
    ((7, 5), "Tesla T4", torch.float16),
    ((8, 0), "NVIDIA A100-SXM4-80GB", torch.bfloat16),
    ((9, 0), "NVIDIA H100 80GB HBM3", torch.bfloat16),
])
def test_gpu_auto_dtype_is_bfloat16_where_supported_else_float16(monkeypatch, caplog, capability, name, expected):
    fake_gpu(monkeypatch, capability, name)
    with caplog.at_level(logging.INFO, logger="aim_llava.capabilities"):
        assert resolve_dtype("auto", CONFIG, torch.device("cuda:0")) == expected
    sm = 10 * capability[0] + capability[1]
    assert caplog.records[0].getMessage() == f"dtype auto on cuda:0 ({name}, sm_{sm}): {str(expected)[6:]}"
    assert resolve_dtype("bfloat16", CONFIG, torch.device("cuda:0")) == torch.bfloat16  # asked for: kept


def test_gpu_auto_dtype_keeps_a_float16_checkpoint():
    h100 = DeviceCapabilities("cuda:0", "H100", 90, True, True, torch.__version__)
    assert h100.auto_dtype(torch.float16) == torch.float16


@pytest.mark.parametrize("capability", [70, 75, 80, 86, 89, 90, 100])
@pytest.mark.parametrize("triton", [True, False])
def test_auto_importance_kernel_is_fused_only_where_known_to_compile(capability, triton):
    gpu = DeviceCapabilities("cuda:0", "GPU", capability, capability >= 80, triton, torch.__version__)
    fused = triton and capability in (80, 86, 89, 90)
    for dtype in (torch.bfloat16, torch.float16):
        assert gpu.importance_kernel(dtype) == ("fused" if fused else "chunked")
    assert gpu.importance_kernel(torch.float32) == "chunked"  # no tensor cores for IEEE float32 products


def test_auto_importance_kernel_asks_the_device(monkeypatch):
    """``auto_kernel`` reads the table of the tensors' device: factored on the CPU; on a faked T4
    chunked, on a faked H100 the fused kernel where Triton is installed."""
    assert auto_kernel(torch.device("cpu"), torch.bfloat16) == auto_kernel(torch.device("cpu"), torch.float32) == "factored"
    fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    assert auto_kernel(torch.device("cuda:0"), torch.float16) == "chunked"
    device_capabilities.cache_clear()
    fake_gpu(monkeypatch, (9, 0), "NVIDIA H100 80GB HBM3")
    triton = device_capabilities("cuda:0").triton
    assert auto_kernel(torch.device("cuda:0"), torch.bfloat16) == ("fused" if triton else "chunked")
    assert 90 in FUSED_IMPORTANCE_CAPABILITIES


def test_capabilities_are_read_once_per_device(monkeypatch):
    asked = fake_gpu(monkeypatch, (8, 6), "NVIDIA RTX A6000")
    first = device_capabilities("cuda:0")
    assert device_capabilities("cuda:0") is first and asked == [0]
    assert first == DeviceCapabilities("cuda:0", "NVIDIA RTX A6000", 86, True, first.triton, torch.__version__)
