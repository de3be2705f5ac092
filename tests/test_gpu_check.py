"""scripts/gpu_check.py's time guard on a fake clock (each phase started only when the time left
covers it, stopped at the budget, the summary written after every phase whatever happened), its
targets against a hand computation, every runtime fallback counted per phase (the CUDA graph's
included), its refusal to start without PyAV, its bounded wait for a killed command, and
scripts/gpu_check.sh end to end with no time at all."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPTS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class FakeMachine:
    """A clock that only moves when a command 'runs', for the seconds given per command name; a
    command that would run past its timeout is stopped there (exit code None)."""

    def __init__(self, seconds: dict[str, float], exit_codes: dict[str, int] | None = None,
                 warnings: dict[str, str] | None = None):
        self.now, self.seconds, self.exit_codes, self.warnings = 0.0, seconds, exit_codes or {}, warnings or {}
        self.calls = []

    def clock(self) -> float:
        return self.now

    def run(self, command, timeout_s):
        name = command[0]
        self.calls.append((name, timeout_s))
        if self.seconds[name] > timeout_s:
            self.now += timeout_s
            return None, f"partial output\n{self.warnings.get(name, '')}"
        self.now += self.seconds[name]
        return self.exit_codes.get(name, 0), f"{name} output\n{self.warnings.get(name, '')}\nlast line of {name}"


def test_phases_run_while_the_time_left_covers_them(gpu_check, tmp_path):
    """Budget 100 s, 10 s of it kept back for the summary: a phase starts only if the time left
    covers what it needs, and each command is stopped at the phase's limit or the budget's end."""
    Phase = gpu_check.Phase
    assert gpu_check.RESERVE_S == 10
    phase_list = [Phase("a", "two commands", needs_s=20, limit_s=50, commands=(("a1",), ("a2",))),
                  Phase("b", "needs more than is left", needs_s=70, limit_s=100, commands=(("b",),)),
                  Phase("c", "fails", needs_s=5, limit_s=30, commands=(("c",), ("never",))),
                  Phase("d", "stopped at its limit", needs_s=5, limit_s=8, commands=(("d",),)),
                  Phase("e", "stopped at the budget", needs_s=5, limit_s=100, commands=(("e",),)),
                  Phase("f", "no time left", needs_s=1, limit_s=10, commands=(("f",),))]
    machine = FakeMachine({"a1": 10, "a2": 15, "b": 1, "c": 2, "d": 50, "e": 1000, "f": 1}, exit_codes={"c": 3})
    progress = []
    results = gpu_check.run_phases(phase_list, 100.0, machine.clock, machine.run, tmp_path,
                                   lambda results: progress.append([r.status for r in results]))
    # a1 gets the phase's 50 s, a2 what is left of them after 10 s; at t = 25, 65 s are left
    assert machine.calls == [("a1", 50), ("a2", 40), ("c", 30), ("d", 8), ("e", 55)]
    assert [(r.name, r.status, r.note) for r in results] == [
        ("a", "ok", ""), ("b", "skipped", "65 s left, needs 70 s"), ("c", "failed", "exit 3: last line of c"),
        ("d", "timed out", "stopped after 8 s"), ("e", "timed out", "stopped after 55 s"),
        ("f", "skipped", "0 s left, needs 1 s")]
    assert [r.seconds for r in results] == [25, 0, 2, 8, 55, 0]
    assert len(progress) == 6 and progress[-1] == [r.status for r in results]  # the summary after every phase
    assert machine.now == 90  # nothing ran into the reserve


def bench_report(rows: dict[str, dict]) -> dict:
    base = {"importance_s": 0.0, "vision_s": 0.05, "ttft_s": 0.3, "decode_tokens_per_s": 100.0, "graph_capture_s": 0.02}
    return {"frames": 32, "batch": 1, "dtype": "bfloat16", "attn": "sdpa", "machine": "H200", "torch": "2.11",
            "repeats": 3, "rows": [{**base, "config": name, **values} for name, values in rows.items()]}


def test_targets_and_summary_from_the_bench_reports(gpu_check, tmp_path):
    PhaseResult = gpu_check.PhaseResult
    at32 = bench_report({"baseline": {"prefill_s": 0.170}, "aim_merge_only": {"prefill_s": 0.046},
                         "aim_default": {"prefill_s": 0.030, "importance_s": 0.003, "decode_tokens_per_s": 160.0},
                         "aim_prune_only": {"prefill_s": 0.150}})
    at192 = bench_report({"aim_merge_only": {"prefill_s": 0.265}, "aim_default": {"prefill_s": 0.200,
                                                                                  "importance_s": 0.010}})
    kernels = {"rows": [{"batch": 1, "cache": 1769, "implementation": "eager", "error": 0.004, "us": 31.5},
                        {"batch": 1, "cache": 1769, "implementation": "sdpa", "error": 0.002, "us": 12.25,
                         "fastest": True},
                        {"batch": 1, "cache": 1769, "implementation": "sdpa:cudnn", "unsupported": "No kernel"}]}
    overlap = {"arch": "llava-onevision-qwen2-7b", "frames": 32, "config": "aim_default", "dtype": "bfloat16",
               "device": "H200", "rows": [
                   {"layer": 14, "tokens": 1669, "visual_kept": 1373, "overlap": 1.0, "max_abs_diff": 2e-6,
                    "model_ms": 1.5, "reference_ms": 3.0, "model_peak_mib": 10},
                   {"layer": 15, "tokens": 1473, "visual_kept": 1177, "overlap": 0.9856, "max_abs_diff": 3e-3,
                    "model_ms": 1.2, "reference_ms": 2.5, "model_peak_mib": 8}]}
    results = [PhaseResult("prefill_32f", "", "ok", 50, "", {"prefill_32f": at32}),
               PhaseResult("prefill_192f", "", "ok", 40, "", {"prefill_192f": at192}),
               PhaseResult("overlap", "", "ok", 30, "", {"importance_overlap_32f": overlap}),
               PhaseResult("decode_b16", "", "skipped", 0, "10 s left, needs 45 s"),
               PhaseResult("decode_attn", "", "ok", 30, "", {"decode_attention_kernels": kernels})]
    checks = {check["target"]: (check["measured"], check["met"]) for check in gpu_check.targets(results)}
    assert checks["importance <= 5% of aim_default's prefill, 32 frames"] == ("10%", False)  # 3 / 30 ms
    assert checks["importance <= 10% of aim_default's prefill, 192 frames"] == ("5%", True)
    assert checks["aim_default prefill <= 0.8x aim_merge_only's, 32 frames"] == ("0.652x", True)
    assert checks["aim_default prefill <= 0.8x aim_merge_only's, 192 frames"] == ("0.755x", True)
    assert checks["aim_default >= 5.1x faster than baseline, 32 frames"] == ("5.67x", True)
    assert checks["aim_prune_only >= 1.2x faster than baseline, 32 frames"] == ("1.13x", False)
    assert checks["aim_default at 192 frames below the 32-frame baseline's prefill"] == ("1.18x", False)
    assert checks["decode >= 150 tokens/s at batch 1 (aim_default, CUDA graph)"] == ("160 tok/s", True)
    assert checks["kept tokens >= 99% those of the float32 importance at every pruning layer, 32 frames"] == (
        "98.6%", False)  # the least of the layers
    assert checks["kept tokens >= 99% those of the float32 importance at every pruning layer, 192 frames"] == (
        None, None)
    assert checks["decode >= 1,500 tokens/s in total at batch 16 (aim_default)"] == (None, None)
    assert checks["time to first token from the mp4 <= 250 ms (aim_default)"] == (None, None)
    gpu_check.write_summary(tmp_path, results, 480, 123)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [phase["status"] for phase in summary["phases"]] == ["ok", "ok", "ok", "skipped", "ok"]
    assert summary["fallbacks"] == []
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| decode_b16 |  | skipped | 0 | 0 | 10 s left, needs 45 s |" in text
    assert "| aim_default | 30.0 | 3.0 (10%) |" in text
    assert "| 15 | 1473 | 1177 | 98.56% | 3.0e-03 | 1.2 | 2.5 |" in text
    assert "| 1 | 1769 | sdpa | 12.2 (fastest) | 2.0e-03 |" in text and "| sdpa:cudnn | unsupported: No kernel |" in text


IMPORTANCE_FALLBACK = ("aim-llava: the fused importance kernel failed (RuntimeError: ptxas); the chunked kernel "
                       "takes its place for the rest of this process")
GRAPH_FALLBACK = ("aim-llava: CUDA-graph decoding failed (GraphCaptureError: its replay ...); eager decoding takes "
                  "its place for the rest of this process")


def test_every_fallback_is_counted_per_phase_and_a_graph_fallback_voids_the_decode_target(gpu_check, tmp_path):
    """The warnings each command printed (each process says it once) are kept per phase and
    counted in the summary; the CUDA graph's fallback among them (it used to print another
    message, which the summary missed) leaves the decode rate of its phase measured on eager
    decoding: shown, not judged."""
    from aim_llava.model.language_model.generation import GRAPH_FALLBACK as NAME

    assert gpu_check.GRAPH_FALLBACK == NAME and NAME in GRAPH_FALLBACK
    Phase = gpu_check.Phase
    phase_list = [Phase("prefill_32f", "", needs_s=1, limit_s=50, commands=(("p1",), ("p2",))),
                  Phase("decode_b16", "", needs_s=1, limit_s=50, commands=(("d",),))]
    machine = FakeMachine({"p1": 1, "p2": 1, "d": 1},
                          warnings={"p1": f"{GRAPH_FALLBACK}\n{IMPORTANCE_FALLBACK}", "p2": GRAPH_FALLBACK})
    results = gpu_check.run_phases(phase_list, 100.0, machine.clock, machine.run, tmp_path, lambda results: None)
    assert [len(result.fallbacks) for result in results] == [3, 0]
    results[0].reports["prefill_32f"] = bench_report({"aim_default": {"prefill_s": 0.03, "decode_tokens_per_s": 160.0}})
    results[1].reports["decode_b16"] = bench_report({"aim_default": {"prefill_s": 0.03, "decode_tokens_per_s": 1600.0}})
    checks = {check["target"]: (check["measured"], check["met"]) for check in gpu_check.targets(results)}
    assert checks["decode >= 150 tokens/s at batch 1 (aim_default, CUDA graph)"] == (
        "160 tok/s (eager decoding: the CUDA-graph fallback fired)", None)
    assert checks["decode >= 1,500 tokens/s in total at batch 16 (aim_default)"] == ("1.6e+03 tok/s", True)
    gpu_check.write_summary(tmp_path, results, 480, 20)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["fallbacks"] == [{"phase": "prefill_32f", "warning": GRAPH_FALLBACK, "count": 2},
                                    {"phase": "prefill_32f", "warning": IMPORTANCE_FALLBACK, "count": 1}]
    text = (tmp_path / "gpu_check.md").read_text()
    assert text.startswith("# gpu_check: 20 s of a 480 s budget; runtime fallbacks fired: 3")
    assert f"- prefill_32f, 2x: {GRAPH_FALLBACK}" in text and f"- prefill_32f, 1x: {IMPORTANCE_FALLBACK}" in text


def test_it_refuses_to_start_without_pyav(gpu_check, tmp_path, monkeypatch, capsys):
    """Without PyAV the video phase would fail last, after minutes: one line before any phase."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real_find_spec(name, *a))
    monkeypatch.setattr(gpu_check, "run_phases", lambda *args: pytest.fail("a phase was started"))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path / "out")])
    assert gpu_check.main() == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("gpu_check: not started: av:")
    assert "pip install av" in lines[0] and not (tmp_path / "out").exists()


def test_a_killed_command_is_waited_for_a_bounded_time(gpu_check, tmp_path, monkeypatch):
    """A command stopped at its timeout whose child left its process group (a new session) and
    keeps the output pipe open: its output is given up after KILL_WAIT_S, not waited for until
    that child exits."""
    monkeypatch.setattr(gpu_check, "KILL_WAIT_S", 1.0)
    command = ("bash", "-c", "setsid sleep 120 & echo child $!; sleep 120")
    started = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        code, output = gpu_check.run_command(command, 2.0, log)
    elapsed = time.monotonic() - started
    child = int(output.split("child ", 1)[1].split()[0])
    os.kill(child, signal.SIGKILL)
    assert code is None and elapsed < 60 and "output cut 1 s after the kill" in output


def test_the_script_with_no_time_left_writes_its_summary(tmp_path):
    """``gpu_check.sh`` with a budget of zero, on this CPU machine: every phase skipped, both
    summaries and the log written, exit code 0."""
    env = dict(os.environ, GPU_CHECK_BUDGET_S="0", PYTHON=sys.executable)
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [phase["name"] for phase in summary["phases"]] == ["machine", "tests", "prefill_32f", "prefill_192f",
                                                              "overlap", "decode_eager", "decode_b16", "decode_attn",
                                                              "ttft_video"]
    assert {phase["status"] for phase in summary["phases"]} == {"skipped"}
    assert all(target["met"] is None for target in summary["targets"])
    assert (tmp_path / "gpu_check.md").exists() and (tmp_path / "gpu_check.log").exists()


@pytest.mark.parametrize("script, args", [("gpu_check.sh", []), ("gpu_measure.sh", ["no-such-phase"])])
def test_the_scripts_write_to_gpu_results_by_default(tmp_path, script, args):
    """Without OUTDIR both scripts write to gpu_results/ of the checkout, whatever the variable OUT
    holds (before, $OUT where it was set: a name a user's machine may use for anything)."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_check.py", "gpu_measure.sh"):
        shutil.copy(SCRIPTS / name, checkout / "scripts" / name)
    elsewhere = tmp_path / "elsewhere"
    env = dict(os.environ, OUT=str(elsewhere), GPU_CHECK_BUDGET_S="0", PYTHON=sys.executable,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", str(checkout / "scripts" / script), *args], capture_output=True, text=True,
                            timeout=120, env=env)
    expected = {"gpu_check.json", "gpu_check.md", "gpu_check.log"} if args == [] else {"machine_no-such-phase.txt"}
    assert not elsewhere.exists(), result.stderr
    assert expected <= {path.name for path in (checkout / "gpu_results").iterdir()}, result.stderr
    assert (result.returncode == 0) == (script == "gpu_check.sh"), result.stderr
