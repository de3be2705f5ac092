#!/usr/bin/env python
"""Requests per second of vLLM without and with the aim-llava plugin, next to aim-llava's own
engine, for the same reductions, on a random-weight checkpoint (speed only: the weights' values do
not change the work).

Run it in the vLLM environment (scripts/run_vllm_tests.sh builds .venv-vllm):

    .venv-vllm/bin/python scripts/bench_vllm.py --arch llava-onevision-qwen2-0.5b --frames 32 --requests 16

Each engine and reduction runs in a fresh child process: one warm-up request, then ``--repeats``
rounds of ``--requests`` requests, each request with a video of its own (random frames; no video
is seen twice, so no cache is shared between requests or rounds). vLLM gets a round's requests at
once (continuous batching); aim-llava's engine answers them one after another (batch size 1). The
figure is a round's requests divided by its wall time: first-token times of requests that vLLM
schedules together are not comparable with those of requests answered one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aim_llava.sample_media import random_frames
from aim_llava.vllm_plugin import ARCHITECTURE, CONFIG_KEY

QUESTION = "Describe the video."
PLUGIN = {"architectures": [ARCHITECTURE]}
TINY = "tiny"


def videos(first: int, count: int, frames: int) -> list:
    """``count`` different random videos of ``frames`` 384x384 frames (the processors' size), the
    ``first``-th onwards."""
    return [random_frames(frames, 384, 384, seed=seed) for seed in range(first, first + count)]


def rounds(args) -> list[list]:
    """The warm-up round (one video), then ``args.repeats`` rounds of ``args.requests`` videos."""
    sizes = [1] + [args.requests] * args.repeats
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [videos(start, size, args.frames) for start, size in zip(starts, sizes)]


def run_vllm(args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    # On the CPU, vLLM binds its worker's threads to the cores it does not reserve for the
    # serving front end (on 2 cores: 1 thread); give it every core, as our engine has.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import torch
    from vllm import LLM, SamplingParams

    from aim_llava.conversation import build_prompt

    overrides = {} if args.engine == "vllm" else {**PLUGIN, CONFIG_KEY: args.preset}
    # vLLM sizes its encoder cache for at most 16 frames a video, or for max_num_batched_tokens
    # when larger: enough for a whole video's tokens without merging.
    length = args.frames * 196 + 256
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=not torch.cuda.is_available(), seed=0,
              max_model_len=length, max_num_batched_tokens=length, limit_mm_per_prompt={"image": 0, "video": 1},
              hf_overrides=overrides)
    prompt = build_prompt(QUESTION).replace("<image>", "<video>")
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for frames in rounds(args):
        started = time.perf_counter()
        outputs = llm.generate([{"prompt": prompt, "multi_modal_data": {"video": video}} for video in frames], sampling)
        rows.append((len(outputs) / (time.perf_counter() - started),
                     statistics.mean(len(o.prompt_token_ids) for o in outputs)))
    return summary(rows[1:])


def run_ours(args) -> dict:
    import torch

    from aim_llava.pipeline import GenerationOptions, VideoLLM
    from aim_llava.video import VideoClip

    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = VideoLLM.from_pretrained(args.model, reduction=args.preset, device=device, dtype=args.dtype,
                                   generation=GenerationOptions(max_new_tokens=args.max_tokens))
    rows = []
    for frames in rounds(args):
        prompt_tokens = []
        started = time.perf_counter()
        for video in frames:
            clip = VideoClip(video, list(range(len(video))), [float(i) for i in range(len(video))],
                             float(len(video)), 1.0, "random")
            prompt_tokens.append(llm.respond(llm.encode(clip), [(QUESTION, None)]).prompt_tokens)
        rows.append((len(frames) / (time.perf_counter() - started), statistics.mean(prompt_tokens)))
    return summary(rows[1:])


def summary(rows: list[tuple[float, float]]) -> dict:
    """The timed rounds' requests/s (each, and their median) and prompt tokens per request."""
    rates = [rate for rate, _ in rows]
    return {"requests_per_s": statistics.median(rates), "rounds_requests_per_s": rates, "prompt_tokens": rows[0][1]}


def child(args) -> None:
    row = run_vllm(args) if args.engine in ("vllm", "vllm+plugin") else run_ours(args)
    Path(args.result).write_text(json.dumps(dict(row, engine=args.engine, preset=args.preset)))


def write_checkpoint(arch: str, folder: Path) -> Path:
    """A random checkpoint of ``arch`` in the transformers layout with processor files (vLLM's
    format); ``tiny``: the tests' tiny model with a text head size vLLM's CPU attention supports."""
    from aim_llava.tiny_checkpoint import write_random_checkpoint, write_tiny_checkpoint

    if arch == TINY:
        return write_tiny_checkpoint(folder, "hf", head_size=64, processor=True)
    from aim_llava.architectures import architecture

    return write_random_checkpoint(folder, architecture(arch), layout="hf", processor=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an HF-layout checkpoint with processor files (default: write a random one)")
    parser.add_argument("--arch", default="llava-onevision-qwen2-0.5b",
                        help=f"architecture of the random checkpoint, or {TINY!r} (the tests' tiny model)")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16, help="requests per round (at least 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (at least 3)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--presets", nargs="+", default=["baseline", "aim_merge_only"])
    parser.add_argument("--engines", nargs="+", default=["vllm", "vllm+plugin", "aim-llava"],
                        choices=["vllm", "vllm+plugin", "aim-llava"], help="vllm runs the baseline only")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.requests < 16 or args.repeats < 3:
        parser.error("--requests must be at least 16 and --repeats at least 3: fewer give no figure worth a table")
    if args.dtype is None:
        import torch

        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if args.engine:
        child(args)
        return
    with tempfile.TemporaryDirectory() as work:
        if args.model is None:
            args.model = str(write_checkpoint(args.arch, Path(work) / "model"))
        runs = [(engine, preset) for engine in args.engines for preset in args.presets
                if (engine == "vllm") == (preset == "baseline") or engine == "aim-llava"]
        rows = []
        for engine, preset in runs:
            result = Path(work) / "row.json"
            command = [sys.executable, __file__, "--model", args.model, "--frames", str(args.frames),
                       "--requests", str(args.requests), "--repeats", str(args.repeats),
                       "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
                       "--engine", engine, "--preset", preset, "--result", str(result)]
            print(f"running {engine} / {preset} ...", file=sys.stderr, flush=True)
            done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                sys.exit(f"{engine} / {preset} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(result.read_text()))
    print("| engine | reduction | prompt tokens / request | requests/s (median) | requests/s per round |")
    print("| --- | --- | ---: | ---: | --- |")
    for row in rows:
        each = ", ".join(f"{rate:.3g}" for rate in row["rounds_requests_per_s"])
        print(f"| {row['engine']} | {row['preset']} | {row['prompt_tokens']:.0f} | {row['requests_per_s']:.3g} "
              f"| {each} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "frames": args.frames, "requests": args.requests,
                                               "repeats": args.repeats, "max_tokens": args.max_tokens,
                                               "dtype": args.dtype, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
