"""Compute accounting, the budget solver, and the flops/bench commands."""

import json

import pytest
import torch
from conftest import plan, prompt_ids, random_frames

from aim_llava.cli import main
from aim_llava.flops import flops_report, resolve_architecture
from aim_llava.reduction.budget import BudgetError, candidates, solve_budget
from aim_llava.reduction.config import load_reduction_config


def spec_flops(hidden, kv, inter, tokens):
    """docs/algorithms.md §4 written out: 2 n (linear weights) + 4 n^2 H per layer."""
    weights = hidden * hidden * 2 + hidden * kv * 2 + hidden * inter * 3
    return sum(2 * n * weights + 4 * n * n * hidden for n in tokens)


@pytest.mark.parametrize("config, published", [("baseline", 99.63), ("aim_default", 14.76)])
def test_published_figures(config, published):
    name, arch = resolve_architecture("llava-onevision-qwen2-7b")
    report = flops_report(name, arch, load_reduction_config(config), frames=32, text_tokens=100)
    assert abs(report.prefill_tflops - published) / published < 0.01
    assert report.prefill_tflops == pytest.approx(spec_flops(3584, 512, 18944, report.paper_tokens_per_layer) / 1e12)


def test_flops_tokens_equal_what_the_model_recorded(loaded, tiny_qwen_dir):
    tokenizer, model, processor, _ = loaded
    ids = prompt_ids(tokenizer, "Describe the video.")
    video = processor.preprocess(random_frames(32, 48, 64, seed=2))["pixel_values"]
    with torch.no_grad():
        out = model(ids, images=[video], modalities=["video"], reduction=plan(model, "aim_default"))
    recorded = [layer[0] for layer in out.reduction.visual_tokens_per_layer]
    text = ids.shape[1] - 1
    name, arch = resolve_architecture(str(tiny_qwen_dir / "config.json"))
    report = flops_report(name, arch, load_reduction_config("aim_default"), frames=32, text_tokens=text)
    assert report.tokens_per_layer == [n + text for n in recorded]
    assert report.visual_tokens == recorded[0] == 32 * 49 + 1


@pytest.mark.parametrize("budget", ["budget:0.15", "budget:0.4", "budget:0.9", "budget:30tflops"])
def test_budget_solver_picks_least_aggressive_feasible(budget):
    name, arch = resolve_architecture("llava-onevision-qwen2-7b")
    chosen = solve_budget(budget, arch, frames=32)
    baseline = flops_report(name, arch, load_reduction_config("baseline"), 32, 100).prefill_tflops
    limit = 30.0 if budget.endswith("tflops") else float(budget.split(":")[1]) * baseline
    cost = flops_report(name, arch, chosen, 32, 100).prefill_tflops
    assert cost <= limit
    others = [flops_report(name, arch, c, 32, 100).prefill_tflops for c in candidates(28)]
    assert not any(cost < other <= limit for other in others)


def test_budget_errors():
    _, arch = resolve_architecture("llava-onevision-qwen2-7b")
    with pytest.raises(BudgetError, match="no AIM setting fits"):
        solve_budget("budget:0.001", arch, frames=32)
    with pytest.raises(BudgetError, match="cannot read"):
        solve_budget("budget:fast", arch, frames=32)
    with pytest.raises(BudgetError, match="fraction must lie"):
        solve_budget("budget:1.5", arch, frames=32)


def test_mask_mode_executes_full_length():
    name, arch = resolve_architecture("llava-onevision-qwen2-7b")
    masked = flops_report(name, arch, load_reduction_config("aim_default_mask"), 32, 100)
    merged_only = flops_report(name, arch, load_reduction_config("aim_merge_only"), 32, 100)
    assert masked.prefill_tflops == pytest.approx(14.755, abs=0.01)
    assert masked.prefill_tflops_executed == pytest.approx(merged_only.prefill_tflops_executed)


def test_flops_command_json(capsys):
    code = main(["flops", "--arch", "llava-onevision-qwen2-7b", "--frames", "32", "--text-tokens", "100",
                 "--config", "aim_default", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert isinstance(report["prefill_tflops"], float) and len(report["tokens_per_layer"]) == 28
    assert main(["flops", "--arch", "no-such-model", "--frames", "3"]) == 2
    assert "unknown architecture" in capsys.readouterr().err


def test_bench_command_on_tiny_model(capsys, tiny_qwen_dir, tmp_path):
    code = main(["bench", "--model", str(tiny_qwen_dir), "--frames", "4", "--repeats", "1", "--decode-tokens", "3",
                 "--configs", "baseline,aim_default,budget:0.5", "--json", str(tmp_path / "b.json"),
                 "--plot", str(tmp_path / "b.png")])
    out = capsys.readouterr().out
    assert code == 0 and "| aim_default |" in out
    report = json.loads((tmp_path / "b.json").read_text())
    assert [row["config"] for row in report["rows"]][:2] == ["baseline", "aim_default"]
    assert report["rows"][1]["tokens_per_layer"][0] < report["rows"][0]["tokens_per_layer"][0]
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_bench_reports_every_stage_from_a_video(capsys, tiny_qwen_dir, tmp_path):
    from aim_llava.sample_media import write_sample_video

    video = write_sample_video(tmp_path / "clip.mp4", num_frames=40, fps=20)
    code = main(["bench", "--model", str(tiny_qwen_dir), "--frames", "3", "--repeats", "1", "--decode-tokens", "3",
                 "--configs", "baseline,aim_default", "--video", str(video), "--batch", "2",
                 "--json", str(tmp_path / "b.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["source"] == str(video) and report["batch"] == 2
    for row in report["rows"]:
        stages = [row[key] for key in ("read_s", "preprocess_s", "vision_s", "pre_llm_s", "prefill_s")]
        assert all(value > 0 for value in stages)
        assert row["ttft_s"] == pytest.approx(sum(stages))
        assert row["decode_tokens_per_s"] > 0
    assert "| read s | preprocess s | vision s | pre-LLM s | TTFT s |" in capsys.readouterr().out


@pytest.mark.parametrize("exact", [True, False])
def test_peak_memory_sees_a_freed_allocation(monkeypatch, exact):
    """A 256 MiB buffer written and freed inside the block: the kernel's peak RSS (Linux) or the
    sampling thread (elsewhere; forced here) reports it, though RSS is back down at the end. The
    buffer is freed only once the sampler has read an RSS that holds it, however slowly the
    thread is scheduled."""
    import threading

    import numpy as np
    import psutil

    from aim_llava import bench
    from aim_llava.bench import PeakMemory

    if exact and not PeakMemory.CLEAR_REFS.exists():
        pytest.skip("no /proc/self/clear_refs (not Linux)")
    if not exact:
        monkeypatch.setattr(PeakMemory, "CLEAR_REFS", PeakMemory.CLEAR_REFS.parent / "no-such-file" / "x")
    seen = threading.Event()

    class WatchedProcess(psutil.Process):
        """Sets ``seen`` once an RSS read after the first one exceeds it by 240 MiB."""

        def memory_info(self):
            info = super().memory_info()
            self.first = getattr(self, "first", info.rss)
            if info.rss > self.first + 240 * 2**20:
                seen.set()
            return info

    monkeypatch.setattr(bench.psutil, "Process", WatchedProcess)
    with PeakMemory(torch.device("cpu")) as memory:
        buffer = np.ones(256 * 2**20, dtype=np.uint8)
        assert exact or seen.wait(timeout=60), "the sampling thread never read the raised RSS"
        del buffer
    assert (memory.thread is None) == exact
    assert 240 * 2**20 < memory.extra < 300 * 2**20
