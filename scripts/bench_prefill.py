#!/usr/bin/env python
"""Prefill benchmark: reduction configs on a random-weight model of a real architecture.

Speed does not depend on weight values, so no checkpoint is needed. The vision tower runs once
(its cost is the same for every config); then, for each config in turn (alternating, after a
warm-up, median of the repeats): the pre-LLM step (pooling + merging), the LLM prefill with a KV
cache, the time spent computing PageRank importance, and the extra peak memory of the prefill
(CUDA max allocated on GPU, sampled RSS on CPU), beside the analytic FLOPs (SPEC section 4) of
the tokens the model actually processed at each layer.

    python scripts/bench_prefill.py --arch llava-onevision-qwen2-0.5b --frames 16 --device cpu
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import threading
import time

import psutil
import torch

import aim_llava.reduction.methods.aim as aim_method
from aim_llava.architectures import ARCHITECTURES, architecture, random_model
from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.flops import prefill_flops
from aim_llava.model.language_model.kv_cache import KVCache


class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start


def release_freed_memory() -> None:
    """Hand memory that glibc keeps after frees back to the OS, so RSS growth shows new peaks."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Extra peak memory of a block: CUDA max allocated, or RSS sampled every millisecond."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            self.process = psutil.Process()
            self.base = self.peak = self.process.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.extra = self.peak - self.base


def timed_importance(seconds: list[float], device: torch.device, name: str):
    original = getattr(aim_method, name)

    def wrapper(*args, **kwargs):
        with Clock(device) as c:
            result = original(*args, **kwargs)
        seconds.append(c.seconds)
        return result

    return wrapper


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = architecture(args.arch)
    model = random_model(config, device, dtype, args.attn)
    pixels = torch.randn(args.frames, 3, config.vision.image_size, config.vision.image_size, device=device)
    with torch.no_grad(), Clock(device) as vision:
        frame_features = model.encode_images(pixels)
    text = torch.randint(0, 1000, (args.text_tokens,), device=device)
    ids = torch.cat([text[:14], torch.tensor([IMAGE_TOKEN_INDEX], device=device), text[14:]])[None]
    importance_seconds: list[float] = []
    for kernel in ("pagerank_importance", "pagerank_importance_flex"):
        setattr(aim_method, kernel, timed_importance(importance_seconds, device, kernel))
    results = {name: {"prefill": [], "pre_llm": [], "importance": [], "memory": []} for name in args.configs}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):
            for name in args.configs:
                model.set_reduction(name)
                importance_seconds.clear()
                with Clock(device) as pre:
                    features = model.video_features(frame_features)
                inputs = model.prepare_multimodal_inputs(ids, visual_features=[features])
                with PeakMemory(device) as memory, Clock(device) as prefill:
                    model.prefill(inputs, KVCache(len(model.model.layers)))
                if repeat == 0:
                    continue  # warm-up
                entry = results[name]
                entry["prefill"].append(prefill.seconds)
                entry["pre_llm"].append(pre.seconds)
                entry["importance"].append(sum(importance_seconds))
                entry["memory"].append(memory.extra)
                entry["tokens_per_layer"] = [
                    n + args.text_tokens for n in (layer[0] for layer in model.last_reduction.visual_tokens_per_layer)
                ]
    rows = []
    for name in args.configs:
        entry = results[name]
        flops = prefill_flops(config.text, entry["tokens_per_layer"])
        rows.append({
            "config": name,
            "tokens_layer0": entry["tokens_per_layer"][0],
            "tokens_last_layer": entry["tokens_per_layer"][-1],
            "prefill_tflops": flops / 1e12,
            "prefill_s": statistics.median(entry["prefill"]),
            "pre_llm_s": statistics.median(entry["pre_llm"]),
            "importance_s": statistics.median(entry["importance"]),
            "peak_extra_mib": statistics.median(entry["memory"]) / 2**20,
            "tokens_per_layer": entry["tokens_per_layer"],
        })
    base = rows[0]
    for row in rows:
        row["flops_reduction"] = base["prefill_tflops"] / row["prefill_tflops"]
        row["speedup"] = base["prefill_s"] / row["prefill_s"]
        row["speedup_over_flops_reduction"] = row["speedup"] / row["flops_reduction"]
        row["importance_share"] = row["importance_s"] / row["prefill_s"]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {psutil.cpu_count()} CPUs"
    return {
        "arch": args.arch, "frames": args.frames, "text_tokens": args.text_tokens, "device": str(device),
        "machine": machine, "dtype": args.dtype, "attn": args.attn, "repeats": args.repeats,
        "vision_s": vision.seconds, "torch": torch.__version__, "rows": rows,
    }


def markdown(report: dict) -> str:
    lines = [
        f"{report['arch']}, {report['frames']} frames, {report['text_tokens']} text tokens; {report['machine']}; "
        f"{report['dtype']}, attention {report['attn']}; median of {report['repeats']} after a warm-up; "
        f"vision tower {report['vision_s']:.2f} s (once, same for all configs)",
        "",
        "| config | tokens in layer 0 / last | prefill TFLOPs | FLOPs reduction | prefill s | speedup | "
        "speedup / FLOPs red. | importance s (share) | pre-LLM s | peak extra MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['config']} | {r['tokens_layer0']} / {r['tokens_last_layer']} | {r['prefill_tflops']:.3f} | "
            f"{r['flops_reduction']:.2f}x | {r['prefill_s']:.3f} | {r['speedup']:.2f}x | "
            f"{r['speedup_over_flops_reduction']:.2f} | {r['importance_s']:.3f} ({100 * r['importance_share']:.1f}%) | "
            f"{r['pre_llm_s']:.3f} | {r['peak_extra_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llava-onevision-qwen2-0.5b")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=100)
    parser.add_argument("--configs", type=lambda s: s.split(","), default=["baseline", "aim_default"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    report = run(args)
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
