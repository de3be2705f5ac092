#!/usr/bin/env python
"""The GPU questions that matter most, answered on your GPU within a time budget (run it through
scripts/gpu_check.sh, which installs wheels kept in .whl/ first and starts the clock before that).

    python scripts/gpu_check.py --out DIR [--budget 480] [--started EPOCH_SECONDS]

Phases, in order of value, each started only when the time left covers what it needs (otherwise
recorded as skipped) and stopped when the time left runs out (recorded as timed out):

  machine        the GPU, versions, and what the capability table decides there (dtype, kernel)
  tests          the GPU test tier, its fast subset (FlexAttention, which compiles for minutes, left out)
  prefill_32f    7B, bf16, 32 frames: baseline, aim_merge_only, aim_default, aim_prune_only (3 repeats,
                 importance share, stage times; decode tokens/s at batch 1 with CUDA graphs)
  prefill_192f   7B, 192 frames: aim_default vs aim_merge_only
  overlap        7B, bf16, 32 and 192 frames: at every pruning layer, the share of the float32
                 importance's kept tokens that the GPU's kernel keeps (scripts/importance_overlap.py)
  decode_eager   7B, batch 1, without the CUDA graph
  decode_b16     7B, batch 16, CUDA graphs
  decode_attn    the decode step's attention alone, eager vs SDPA kernels at batch 1/4/16 and three
                 cache lengths (scripts/bench_decode_attention.py), then 7B decode at batch 1 with
                 eager attention instead of SDPA for every step
  ttft_video     time to first token from a 60 s 640x360 H.264 clip read by PyAV

It refuses to start, in one line, when a module a phase needs is missing (PyAV for ttft_video).
Whatever happens then, DIR receives gpu_check.json (every phase's status, seconds, bench reports,
the runtime fallbacks that fired in it and the targets of issues 11/12/24), gpu_check.md (the
same for people, also printed at the end) and gpu_check.log (all output). The summary is
rewritten after every phase, so a run cut short still leaves what finished. The longer
measurements are in scripts/gpu_measure.sh (one phase per run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEVEN_B = "llava-onevision-qwen2-7b"
RESERVE_S = 10.0  # kept back for writing the summary
KILL_WAIT_S = 10.0  # how long a stopped command's output is waited for after its process group is killed
# the line aim_llava.capabilities.RuntimeFallbacks writes when an optimisation is replaced, and the
# name the CUDA graph's fallback has there (aim_llava.model.language_model.generation.GRAPH_FALLBACK)
FALLBACK_WARNING = "takes its place for the rest of this process"
GRAPH_FALLBACK = "CUDA-graph decoding"
REQUIRED_MODULES = {"av": "the ttft_video phase reads its clip with PyAV: pip install av (without network access: "
                          "put its wheel in .whl/, from `bash scripts/fetch_gpu_wheels.sh check` run where pip works)"}
MACHINE_REPORT = """
import json, torch, triton, transformers
from aim_llava.capabilities import device_capabilities
from aim_llava.model.builder import resolve_dtype
from aim_llava.architectures import architecture
device = torch.device("cuda")
table = device_capabilities(str(device))
print("MACHINE " + json.dumps({
    "capabilities": table.__dict__, "triton": triton.__version__, "transformers": transformers.__version__,
    "auto_dtype": str(resolve_dtype("auto", architecture("llava-onevision-qwen2-7b"), device)),
    "auto_importance_kernel": {str(dtype): table.importance_kernel(dtype)
                               for dtype in (torch.bfloat16, torch.float16, torch.float32)}}))
"""


@dataclass(frozen=True)
class Phase:
    """One step of the check: commands run in order; ``needs_s`` is the time it is started with at
    least (its expected length), ``limit_s`` the most it may take."""

    name: str
    what: str
    needs_s: float
    limit_s: float
    commands: tuple[tuple[str, ...], ...]

    @property
    def bench_reports(self) -> tuple[str, ...]:
        """Names of the --json reports its commands write (their ``report:`` arguments)."""
        return tuple(part[len(REPORT):] for command in self.commands for part in command if part.startswith(REPORT))


@dataclass
class PhaseResult:
    name: str
    what: str
    status: str  # ok, failed, timed out, skipped
    seconds: float = 0.0
    note: str = ""
    reports: dict = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)  # the fallback warnings its commands printed, each time


REPORT = "report:"  # a command's argument naming a bench report; the runner puts its path there


def bench(report: str, *options: str) -> tuple[str, ...]:
    """An ``aim-llava bench`` run on the 7B architecture in bf16 whose JSON report is ``report``."""
    return (sys.executable, "-m", "aim_llava.cli", "bench", "--arch", SEVEN_B, "--device", "cuda", "--dtype",
            "bfloat16", "--output", REPORT + report, *options)


def overlap(frames: int) -> tuple[str, ...]:
    """scripts/importance_overlap.py on the 7B architecture in bf16 at ``frames`` frames."""
    return (sys.executable, "scripts/importance_overlap.py", "--arch", SEVEN_B, "--frames", str(frames), "--device",
            "cuda", "--dtype", "bfloat16", "--json", f"{REPORT}importance_overlap_{frames}f")


def phases() -> list[Phase]:
    """The check's phases, in order of value (see the module docstring)."""
    prefill = ("--repeats", "3", "--decode-tokens", "64")
    decode = ("--frames", "32", "--repeats", "3", "--decode-tokens", "64", "--configs", "baseline,aim_default")
    clip = "/tmp/gpu_check_clip60.mp4"
    return [
        Phase("machine", "GPU, versions, the capability table's choices", 20, 60,
              ((sys.executable, "-c", MACHINE_REPORT),)),
        Phase("tests", "pytest tests/gpu, fast subset (no FlexAttention)", 60, 120,
              ((sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", "-k", "not flex"),)),
        Phase("prefill_32f", "7B bf16 prefill, 32 frames, four presets", 60, 150,
              (bench("prefill_32f", "--frames", "32", *prefill,
                     "--configs", "baseline,aim_merge_only,aim_default,aim_prune_only"),)),
        Phase("prefill_192f", "7B bf16 prefill, 192 frames, aim_default vs aim_merge_only", 50, 120,
              (bench("prefill_192f", "--frames", "192", *prefill, "--configs", "aim_merge_only,aim_default"),)),
        Phase("overlap", "7B bf16 kept sets vs the float32 importance, 32 and 192 frames", 40, 100,
              tuple(overlap(frames) for frames in (32, 192))),
        Phase("decode_eager", "7B decode, batch 1, without the CUDA graph", 40, 90,
              (bench("decode_eager", *decode, "--no-cuda-graph"),)),
        Phase("decode_b16", "7B decode, batch 16, CUDA graphs", 45, 100,
              (bench("decode_b16", *decode, "--batch", "16"),)),
        Phase("decode_attn", "decode-step attention per kernel and shape; 7B decode, batch 1, eager attention",
              60, 120, ((sys.executable, "scripts/bench_decode_attention.py", "--device", "cuda", "--dtype",
                         "bfloat16", "--repeats", "20", "--json", REPORT + "decode_attention_kernels"),
                        bench("decode_attn", *decode, "--attn", "eager"))),
        Phase("ttft_video", "time to first token from a 60 s 640x360 clip (PyAV)", 60, 120,
              ((sys.executable, "scripts/make_sample_video.py", clip, "--frames", "1800", "--fps", "30", "--width",
                "640", "--height", "360", "--gop", "250"),
               bench("ttft_video", "--frames", "32", "--repeats", "3", "--decode-tokens", "1", "--video", clip,
                     "--backend", "pyav", "--configs", "baseline,aim_default"))),
    ]


def run_command(command: tuple[str, ...], timeout_s: float, log) -> tuple[int | None, str]:
    """Run ``command`` (its own process group, killed whole at the timeout), its output appended
    to ``log``; returns (exit code or None when timed out, the output)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        code, output = None, stopped_output(process)
    log.write(f"$ {' '.join(command)}\n{output}\n")
    log.flush()
    return code, output


def stopped_output(process: subprocess.Popen) -> str:
    """The output of a command whose process group was just killed, waited for at most
    :data:`KILL_WAIT_S`: a process that left the group (a new session) may still hold the pipe."""
    try:
        return process.communicate(timeout=KILL_WAIT_S)[0]
    except subprocess.TimeoutExpired as still_open:
        process.stdout.close()
        process.wait(timeout=KILL_WAIT_S)  # the command itself was killed: it has exited
        partial = still_open.output.decode(errors="replace") if isinstance(still_open.output, bytes) else ""
        return partial + f"\n(output cut {KILL_WAIT_S:g} s after the kill: a process it started still holds it)"


def fallbacks_fired(output: str) -> list[str]:
    """The runtime fallbacks' warnings in a command's output (the importance kernels, pinned
    memory, CUDA-graph decoding, ...), one per line printed."""
    return [line.strip() for line in output.splitlines() if FALLBACK_WARNING in line]


def missing_modules() -> list[str]:
    """What the phases need and this Python cannot import, one line each."""
    return [f"{module}: {why}" for module, why in REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None]


def run_phases(phase_list: list[Phase], deadline: float, clock: Callable[[], float], run, scratch: Path,
               on_progress: Callable[[list[PhaseResult]], None]) -> list[PhaseResult]:
    """Run each phase that the time left before ``deadline`` (by ``clock``) covers, with
    :data:`RESERVE_S` kept back; ``run(command, timeout_s)`` -> (exit code or None, output).
    ``on_progress`` gets the results so far after every phase."""
    results: list[PhaseResult] = []
    for phase in phase_list:
        left = deadline - clock() - RESERVE_S
        if left < phase.needs_s:
            results.append(PhaseResult(phase.name, phase.what, "skipped",
                                       note=f"{max(0.0, left):.0f} s left, needs {phase.needs_s:.0f} s"))
            on_progress(results)
            continue
        started, status, note, fired = clock(), "ok", "", []
        paths = {name: scratch / f"{name}.json" for name in phase.bench_reports}
        for command in phase.commands:
            command = tuple(str(paths[part[len(REPORT):]]) if part.startswith(REPORT) else part for part in command)
            limit = min(phase.limit_s - (clock() - started), deadline - clock() - RESERVE_S)
            code, output = run(command, max(1.0, limit))
            fired += fallbacks_fired(output)
            if code is None:
                status, note = "timed out", f"stopped after {limit:.0f} s"
                break
            if code != 0:
                lines = [line for line in output.strip().splitlines() if line.strip()]
                status, note = "failed", f"exit {code}: {lines[-1][:300] if lines else ''}"
                break
            if phase.name == "machine":
                note = next((line[8:] for line in output.splitlines() if line.startswith("MACHINE ")), "")
            elif phase.name == "tests":
                note = output.strip().splitlines()[-1] if output.strip() else ""
        reports = {name: json.loads(path.read_text()) for name, path in paths.items() if path.exists()}
        results.append(PhaseResult(phase.name, phase.what, status, clock() - started, note, reports, fired))
        on_progress(results)
    return results


def rows_by_config(report: dict | None) -> dict[str, dict]:
    return {row["config"]: row for row in (report or {}).get("rows", [])}


def targets(results: list[PhaseResult]) -> list[dict]:
    """The targets carried from issues 11 and 12 (H100/H200, 7B, bf16, sdpa), each with what this
    run measured and whether it is met (None: not measured in this run)."""
    reports = {name: report for result in results for name, report in result.reports.items()}
    at32, at192 = rows_by_config(reports.get("prefill_32f")), rows_by_config(reports.get("prefill_192f"))
    b16, video = rows_by_config(reports.get("decode_b16")), rows_by_config(reports.get("ttft_video"))
    eager = {result.name for result in results if any(GRAPH_FALLBACK in line for line in result.fallbacks)}
    checks = []

    def check(target: str, measured: Callable[[], float], unit: str, met: Callable[[float], bool],
              graphed_in: str | None = None) -> None:
        """``graphed_in``: the phase whose CUDA-graph decoding the target is about; if its graph
        fell back to eager decoding, the figure is kept but not judged."""
        try:
            value = measured()
        except (KeyError, ZeroDivisionError):
            checks.append({"target": target, "measured": None, "met": None})
            return
        if graphed_in in eager:
            checks.append({"target": target, "met": None,
                           "measured": f"{value:.3g}{unit} (eager decoding: the CUDA-graph fallback fired)"})
            return
        checks.append({"target": target, "measured": f"{value:.3g}{unit}", "met": bool(met(value))})

    def share(rows: dict, config: str) -> float:
        return 100 * rows[config]["importance_s"] / rows[config]["prefill_s"]

    check("importance <= 5% of aim_default's prefill, 32 frames", lambda: share(at32, "aim_default"), "%",
          lambda v: v <= 5)
    check("importance <= 10% of aim_default's prefill, 192 frames", lambda: share(at192, "aim_default"), "%",
          lambda v: v <= 10)
    for rows, frames in ((at32, 32), (at192, 192)):
        check(f"aim_default prefill <= 0.8x aim_merge_only's, {frames} frames",
              lambda rows=rows: rows["aim_default"]["prefill_s"] / rows["aim_merge_only"]["prefill_s"], "x",
              lambda v: v <= 0.8)
    check("aim_default >= 5.1x faster than baseline, 32 frames",
          lambda: at32["baseline"]["prefill_s"] / at32["aim_default"]["prefill_s"], "x", lambda v: v >= 5.1)
    check("aim_prune_only >= 1.2x faster than baseline, 32 frames",
          lambda: at32["baseline"]["prefill_s"] / at32["aim_prune_only"]["prefill_s"], "x", lambda v: v >= 1.2)
    for frames in (32, 192):
        check(f"kept tokens >= 99% those of the float32 importance at every pruning layer, {frames} frames",
              lambda frames=frames: 100 * min(row["overlap"] for row in reports[f"importance_overlap_{frames}f"]["rows"]),
              "%", lambda v: v >= 99)
    check("aim_default at 192 frames below the 32-frame baseline's prefill",
          lambda: at192["aim_default"]["prefill_s"] / at32["baseline"]["prefill_s"], "x", lambda v: v < 1)
    check("decode >= 150 tokens/s at batch 1 (aim_default, CUDA graph)",
          lambda: at32["aim_default"]["decode_tokens_per_s"], " tok/s", lambda v: v >= 150, "prefill_32f")
    check("decode >= 1,500 tokens/s in total at batch 16 (aim_default)",
          lambda: b16["aim_default"]["decode_tokens_per_s"], " tok/s", lambda v: v >= 1500, "decode_b16")
    check("time to first token from the mp4 <= 250 ms (aim_default)",
          lambda: 1000 * video["aim_default"]["ttft_s"], " ms", lambda v: v <= 250)
    return checks


def bench_table(report: dict) -> list[str]:
    lines = [f"{report['frames']} frames, batch {report['batch']}, {report['dtype']}, attention {report['attn']}, "
             f"{report['machine']}, torch {report['torch']}, median of {report['repeats']}", "",
             "| config | prefill ms | importance ms (share) | vision ms | TTFT ms | decode tok/s | graph capture ms |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        share = 100 * row["importance_s"] / row["prefill_s"] if row["prefill_s"] else 0.0
        lines.append(f"| {row['config']} | {1000 * row['prefill_s']:.1f} | {1000 * row['importance_s']:.1f} "
                     f"({share:.0f}%) | {1000 * row['vision_s']:.1f} | {1000 * row['ttft_s']:.1f} | "
                     f"{row['decode_tokens_per_s']:.1f} | {1000 * row['graph_capture_s']:.1f} |")
    return lines


def overlap_table(report: dict) -> list[str]:
    """scripts/importance_overlap.py's rows: per pruning layer, the kept-set overlap with float32."""
    lines = [f"{report['arch']}, {report['frames']} frames, {report['config']}, {report['dtype']}, {report['device']}",
             "", "| layer | tokens | visual kept | overlap | max abs. log-score diff | ms | float32 ms |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['tokens']} | {r['visual_kept']} | {100 * r['overlap']:.2f}% | "
              f"{r['max_abs_diff']:.1e} | {r['model_ms']:.1f} | {r['reference_ms']:.1f} |" for r in report["rows"]]
    return lines


def decode_attention_table(report: dict) -> list[str]:
    """scripts/bench_decode_attention.py's rows: microseconds per step, fastest correct marked."""
    lines = ["| batch | cache | implementation | us per step | max error |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        timing = (f"{row['us']:.1f}{' (fastest)' if row.get('fastest') else ''} | {row['error']:.1e}" if "us" in row
                  else f"unsupported: {row['unsupported']} | ")
        lines.append(f"| {row['batch']} | {row['cache']} | {row['implementation']} | {timing} |")
    return lines


def fallback_counts(results: list[PhaseResult]) -> list[dict]:
    """Each fallback warning per phase, with how many times its commands printed it (once per
    process in which the optimisation failed)."""
    counts = []
    for result in results:
        for line in dict.fromkeys(result.fallbacks):
            counts.append({"phase": result.name, "warning": line, "count": result.fallbacks.count(line)})
    return counts


def write_summary(out: Path, results: list[PhaseResult], budget_s: float, elapsed_s: float) -> None:
    """gpu_check.json and gpu_check.md under ``out``."""
    checks, fired = targets(results), fallback_counts(results)
    summary = {"budget_s": budget_s, "elapsed_s": elapsed_s, "phases": [asdict(result) for result in results],
               "targets": checks, "fallbacks": fired}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    total = sum(entry["count"] for entry in fired)
    lines = [f"# gpu_check: {elapsed_s:.0f} s of a {budget_s:.0f} s budget; runtime fallbacks fired: {total}", "",
             "| phase | what | status | s | fallbacks | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.what} | {r.status} | {r.seconds:.0f} | {len(r.fallbacks)} | {r.note.replace('|', '/')} |"
              for r in results]
    lines += ["", "## Targets (H100/H200, 7B, bf16, sdpa)", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {c['target']} | {c['measured'] or 'not measured'} | "
              f"{'-' if c['met'] is None else 'yes' if c['met'] else 'NO'} |" for c in checks]
    lines += ["", "## Runtime fallbacks that fired", ""]
    lines += [f"- {entry['phase']}, {entry['count']}x: {entry['warning']}" for entry in fired] or ["none"]
    for result in results:
        for name, report in result.reports.items():
            table = (decode_attention_table if name == "decode_attention_kernels"
                     else overlap_table if name.startswith("importance_overlap") else bench_table)
            lines += ["", f"## {name}", ""] + table(report)
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the budget counts from")
    args = parser.parse_args()
    missing = missing_modules()
    if missing:
        print(f"gpu_check: not started: {'; '.join(missing)}", file=sys.stderr)
        return 2
    started = time.time() if args.started is None else args.started
    deadline = time.monotonic() + args.budget - (time.time() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "gpu_check.log", "a") as log, tempfile.TemporaryDirectory() as scratch:
        def progress(results):
            write_summary(args.out, results, args.budget, time.time() - started)

        results = run_phases(phases(), deadline, time.monotonic,
                             lambda command, timeout: run_command(command, timeout, log), Path(scratch), progress)
    progress(results)
    print((args.out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
