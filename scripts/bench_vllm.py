#!/usr/bin/env python
"""vLLM without and with the aim-llava plugin, next to aim-llava's own engine, for the same
reductions: prompt tokens per request, time to first token and requests/s, on a random-weight
checkpoint (speed only: the weights' values do not change the work).

Run it in the vLLM environment (scripts/run_vllm_tests.sh builds .venv-vllm):

    .venv-vllm/bin/python scripts/bench_vllm.py --frames 32 --requests 16

Each engine and reduction runs in a fresh child process on the same videos (random frames, a
different video per request, so no cache is shared between requests). vLLM gets all requests at
once (continuous batching); its time to first token is the engine's own per-request figure, from
the request's arrival. Our engine answers them one after another (batch size 1); its time to first
token is reading nothing, preprocessing, encoding and prefill of that request. No warm-up request.
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


def videos(count: int, frames: int) -> list:
    """``count`` different random videos of ``frames`` 384x384 frames (the processors' size)."""
    return [random_frames(frames, 384, 384, seed=seed) for seed in range(count)]


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
              hf_overrides=overrides, disable_log_stats=False, skip_mm_profiling=True)
    prompt = build_prompt(QUESTION).replace("<image>", "<video>")
    requests = [{"prompt": prompt, "multi_modal_data": {"video": video}} for video in videos(args.requests, args.frames)]
    started = time.perf_counter()
    outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True))
    wall = time.perf_counter() - started
    return {"prompt_tokens": statistics.mean(len(o.prompt_token_ids) for o in outputs),
            "ttft_s": statistics.mean(o.metrics.first_token_latency for o in outputs),
            "requests_per_s": len(outputs) / wall, "wall_s": wall}


def run_ours(args) -> dict:
    import torch

    from aim_llava.pipeline import GenerationOptions, VideoLLM
    from aim_llava.video import VideoClip

    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = VideoLLM.from_pretrained(args.model, reduction=args.preset, device=device, dtype=args.dtype,
                                   generation=GenerationOptions(max_new_tokens=args.max_tokens))
    prompt_tokens, ttft = [], []
    started = time.perf_counter()
    for frames in videos(args.requests, args.frames):
        clip = VideoClip(frames, list(range(len(frames))), [float(i) for i in range(len(frames))],
                         float(len(frames)), 1.0, "random")
        visual = llm.encode(clip)
        response = llm.respond(visual, [(QUESTION, None)])
        prompt_tokens.append(response.prompt_tokens)
        ttft.append(visual.encode_seconds + response.first_token_s)
    wall = time.perf_counter() - started
    return {"prompt_tokens": statistics.mean(prompt_tokens), "ttft_s": statistics.mean(ttft),
            "requests_per_s": args.requests / wall, "wall_s": wall}


def child(args) -> None:
    row = run_vllm(args) if args.engine in ("vllm", "vllm+plugin") else run_ours(args)
    Path(args.result).write_text(json.dumps(dict(row, engine=args.engine, preset=args.preset)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an HF-layout checkpoint with processor files (default: write a random one)")
    parser.add_argument("--arch", default="llava-onevision-qwen2-0.5b", help="architecture of the random checkpoint")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16)
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
    if args.dtype is None:
        import torch

        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if args.engine:
        child(args)
        return
    with tempfile.TemporaryDirectory() as work:
        if args.model is None:
            from aim_llava.architectures import architecture
            from aim_llava.tiny_checkpoint import write_random_checkpoint

            args.model = str(write_random_checkpoint(Path(work) / "model", architecture(args.arch), layout="hf",
                                                     processor=True))
        runs = [(engine, preset) for engine in args.engines for preset in args.presets
                if not (engine == "vllm" and preset != "baseline") and not (engine == "vllm+plugin" and preset == "baseline")]
        rows = []
        for engine, preset in runs:
            result = Path(work) / "row.json"
            command = [sys.executable, __file__, "--model", args.model, "--frames", str(args.frames),
                       "--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
                       "--engine", engine, "--preset", preset, "--result", str(result)]
            print(f"running {engine} / {preset} ...", file=sys.stderr, flush=True)
            done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                sys.exit(f"{engine} / {preset} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(result.read_text()))
    print("| engine | reduction | prompt tokens / request | time to first token (s) | requests/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['engine']} | {row['preset']} | {row['prompt_tokens']:.0f} | {row['ttft_s']:.1f} | "
              f"{row['requests_per_s']:.3g} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"frames": args.frames, "requests": args.requests,
                                               "max_tokens": args.max_tokens, "dtype": args.dtype, "rows": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
