"""Attention without needless copies: the folded decoding step reads the cache in place, grouped
key/value heads with a mask are not expanded where a fused kernel takes both, and a padded batch
builds its [B, 1, L, L] mask once per token state, not once per layer."""

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_batch, plan, prompt_ids, random_frames
from fake_cuda import aliases
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from aim_llava.model import attention
from aim_llava.model.language_model import modeling_qwen2


class LargestNewTensor(TorchDispatchMode):
    """The most elements of any tensor an operator in the block allocated (views excluded)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not aliases(func):
            sizes = [t.numel() for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
            self.numel = max([self.numel, *sizes])
        return result


def reference_attention(q, k, v, mask, scale):
    """float64, one query head at a time; query head h reads key/value head h // groups."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = q[b, h].double() @ k[b, h // groups].double().T * scale
            scores = scores.masked_fill(~mask[b, 0], float("-inf"))
            out[b, h] = scores.softmax(dim=-1) @ v[b, h // groups].double()
    return out


def grouped_inputs(q_len: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, q_len, 8, generator=gen)
    k, v = torch.randn(2, 2, length, 8, generator=gen), torch.randn(2, 2, length, 8, generator=gen)
    mask = torch.rand(2, 1, q_len, length, generator=gen) > 0.3
    mask[..., 0] = True
    return q, k, v, mask


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_decoding_step_attends_over_the_cache_without_copying_it(implementation):
    """One query per sample over grouped heads is folded into one query group per key/value
    head, so no kernel repeats the cache per query head; the result is the reference's."""
    q, k, v, mask = grouped_inputs(1, 64)
    with LargestNewTensor() as largest:
        out = attention.attend(q, k, v, mask, False, 0.3, implementation)
    assert largest.numel < k.numel()
    assert torch.allclose(out.double(), reference_attention(q, k, v, mask, 0.3), atol=1e-5)


def test_grouped_heads_with_a_mask_go_unexpanded_to_a_kernel_that_takes_both(monkeypatch):
    """Where torch names a fused kernel for grouped heads with a mask (cuDNN on CUDA), SDPA gets
    the key/value heads as they are, with enable_gqa, under that kernel; elsewhere (the CPU here)
    they are expanded. Both equal the reference."""
    q, k, v, mask = grouped_inputs(5, 5, seed=1)
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((k.shape[1], kwargs.get("enable_gqa"), torch._C._get_flash_sdp_enabled()))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    reference = reference_attention(q, k, v, mask, 0.3)
    expanded = attention.attend(q, k, v, mask, True, 0.3, "sdpa")
    monkeypatch.setattr(attention, "grouped_mask_backend", lambda *inputs: SDPBackend.MATH)  # the CPU's stand-in
    unexpanded = attention.attend(q, k, v, mask, True, 0.3, "sdpa")
    assert calls == [(4, False, True), (2, True, False)]  # the named kernel only, the second time
    for out in (expanded, unexpanded):
        assert torch.allclose(out.double(), reference, atol=1e-5)


def test_grouped_heads_are_expanded_when_no_kernel_takes_them_with_a_mask():
    q, k, v, mask = grouped_inputs(5, 5)
    assert attention.grouped_mask_backend(q, k, v, mask) is None  # the CPU: SDPA's kernels there would not fuse


FASTV_MASKED = {"method": "fastv", "layer": 2, "drop_ratio": 0.5, "prune_mode": "mask"}


@pytest.mark.parametrize("spec, states", [("baseline", 1), ("fastv_default", 2), (FASTV_MASKED, 2)], ids=str)
@pytest.mark.parametrize("use_cache", [False, True])
def test_a_padded_batch_builds_its_mask_once_per_token_state(loaded, monkeypatch, spec, states, use_cache):
    """Baseline: one mask for all layers; FastV: one before and one after its pruning layer, also
    when it masks tokens instead of removing them (same length, other validity); with or without
    the KV cache, whose layers each hold their own copy of the validity. The logits equal those
    of a mask built at every layer."""
    tokenizer, model, processor, _ = loaded
    built = []
    real_mask = modeling_qwen2.attention_mask

    def counted(key_valid, q_len):
        built.append(q_len)
        return real_mask(key_valid, q_len)

    videos = [processor.preprocess(random_frames(n, 48, 64, seed=n))["pixel_values"] for n in (3, 2)]
    ids, mask = left_padded_batch([prompt_ids(tokenizer, "Describe the video."), prompt_ids(tokenizer, "What?")])
    kwargs = dict(attention_mask=mask, images=videos, modalities=["video"] * 2, reduction=plan(model, spec),
                  use_cache=use_cache)
    with torch.no_grad():
        with monkeypatch.context() as per_layer:  # the reference: every layer builds its own
            per_layer.setattr(modeling_qwen2.AttentionMasks, "__call__", lambda _, valid, q_len: real_mask(valid, q_len))
            every_layer = model(ids, **kwargs).logits
        monkeypatch.setattr(modeling_qwen2, "attention_mask", counted)
        shared = model(ids, **kwargs).logits
    assert len(built) == states < model.config.text.num_hidden_layers
    assert torch.equal(shared, every_layer)


def test_decode_attention_script_checks_and_times_every_implementation(tmp_path):
    """scripts/bench_decode_attention.py (issue 28 item 10's measurement) on the CPU at small
    shapes: a row per shape and implementation, each that runs within float32 rounding of the
    float64 reference, the kernels the CPU lacks reported as unsupported, one fastest per shape."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "bench_decode_attention.py"
    report = tmp_path / "decode_attention.json"
    result = subprocess.run([sys.executable, "-W", "ignore", str(script), "--device", "cpu", "--dtype", "float32",
                             "--batch", "1,2", "--cache", "40", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                             "--repeats", "2", "--json", str(report)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(report.read_text())["rows"]
    assert [(r["batch"], r["implementation"]) for r in rows] == [
        (batch, name) for batch in (1, 2) for name in ("eager", "sdpa", "sdpa:efficient", "sdpa:cudnn", "sdpa:math")]
    ran = [r for r in rows if "us" in r]
    assert {r["implementation"] for r in ran} == {"eager", "sdpa", "sdpa:math"}
    assert all(r["error"] < 1e-5 and r["us"] > 0 for r in ran)
    assert sum(r.get("fastest", False) for r in rows) == 2

