"""Many questions on one video: items/s of an eval-style run with the reuse cache off, with the
visual cache only and with prefix reuse too, and the time to first token of a second question
on the same clip through the server.

    python scripts/bench_reuse.py [--arch llava-onevision-qwen2-0.5b] [--clips 8] [--questions 3] \\
        [--frames 16] [--presets baseline,aim_merge_only,aim_default] [--modes off,visual,both] \\
        [--max-new-tokens 8] [--parts eval,server,memory] [--checkpoint DIR] [--device cpu] [--json FILE]

A checkpoint of the architecture with random weights is written into ``--checkpoint`` unless it
holds one already (the tiny tokenizer: replies are mostly empty text that rarely ends early, right
for speed). Each clip is a generated 640x360 video; its questions follow each other, as in
Video-MME. Each (preset, mode) runs the eval's own loop (``evaluation.run_config``: batch size 1,
two read-ahead workers) with a fresh cache, and prints the cache's hits and misses. The server's
time to first token is the latency of a ``max_tokens=1`` completion through the server's request
path (in-process, no HTTP: parsing, the media read under the server's limits, the model thread),
of a first question on a clip, then of a second one. ``memory`` prints the bytes a cached clip
takes on the 0.5B and 7B architectures, computed (not measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import string
import tempfile
import time
from pathlib import Path

from aim_llava import evaluation
from aim_llava.architectures import architecture
from aim_llava.bench import machine_name
from aim_llava.cost import kv_cache_bytes
from aim_llava.distributed import Shard
from aim_llava.flops import video_token_counts
from aim_llava.model.builder import load_pretrained_model
from aim_llava.pipeline import GenerationOptions, SamplingOptions, VideoLLM
from aim_llava.records import ResultsFile
from aim_llava.reduction.config import build_plan
from aim_llava.run_settings import run_settings
from aim_llava.sample_media import write_sample_video
from aim_llava.serve import Service
from aim_llava.tiny_checkpoint import write_random_checkpoint

MODES = {"off": {"cache_mb": 0}, "visual": {"prefix_reuse": False}, "both": {}}  # cache off / visual only / + prefix
PARTS = ("eval", "server", "memory")
MEMORY_ARCHS = ("llava-onevision-qwen2-0.5b", "llava-onevision-qwen2-7b")
TEXT_BEFORE_VIDEO = 14  # the qwen_1_5 template's system message and "user" turn, in the real tokenizer
QUESTIONS = ["What is happening in this video?", "Which colour dominates the scene?",
             "How many people appear, and what are they doing at the end of the clip?"]


def eval_items(clips: list[Path], questions: int) -> list[evaluation.Item]:
    return [evaluation.Item(f"c{c}q{q}", str(clip), QUESTIONS[q % len(QUESTIONS)], ["yes", "no", "maybe", "never"],
                            string.ascii_uppercase[q % 4], "all")
            for c, clip in enumerate(clips) for q in range(questions)]


def items_per_second(llm: VideoLLM, items: list[evaluation.Item], reduction, out: Path) -> float:
    results = ResultsFile(out, evaluation.item_key)
    settings = run_settings("bench_reuse", str(llm.model.dtype).removeprefix("torch."), reduction, llm.sampling,
                            llm.generation, llm.conv_template, llm.time_aware)
    try:
        started = time.perf_counter()
        records = evaluation.run_config(llm, items, Shard(), results, reduction, settings)
        seconds = time.perf_counter() - started
    finally:
        results.close()
    failed = [record for record in records if record["error"]]
    if failed:
        raise SystemExit(f"{len(failed)} items failed, the first: {failed[0]['error']}")
    return len(items) / seconds


def completion_seconds(service: Service, clip: Path, question: str, preset: str) -> float:
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip.name}},
                                                      {"type": "text", "text": question}]}],
            "max_tokens": 1, "config": preset}
    raw = json.dumps(body).encode()
    started = time.perf_counter()
    asyncio.run(service.complete(raw))
    return time.perf_counter() - started


def counts_cell(stats: dict | None) -> str:
    """Hits:misses of the visual and the prefix entries ("-" with the cache off)."""
    if stats is None:
        return "-"
    return " / ".join(f"{stats[kind + '_hits']}:{stats[kind + '_misses']}" for kind in ("visual", "prefix"))


def print_tables(rows: list[dict]) -> None:
    if "off" in rows[0]:
        print("| preset | items/s cache off | visual cache | visual + prefix | speedup visual | speedup both | "
              "hits:misses visual / prefix (visual only; both) |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            off = row["off"]
            print(f"| {row['preset']} | {off:.4f} | {row['visual']:.4f} | {row['both']:.4f} | "
                  f"{row['visual'] / off:.2f}x | {row['both'] / off:.2f}x | "
                  f"{counts_cell(row['visual counts'])}; {counts_cell(row['both counts'])} |")
    if "ttft first s" in rows[0]:
        print("\n| preset | server TTFT 1st question s | 2nd question s | 2nd / 1st | hits:misses visual / prefix |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['preset']} | {row['ttft first s']:.2f} | {row['ttft second s']:.2f} | "
                  f"{row['ttft second s'] / row['ttft first s']:.2f} | {counts_cell(row['server counts'])} |")


def cached_clip_bytes(arch_name: str, preset: str, frames: int, bytes_per_value: int = 2) -> dict:
    """Bytes one cached clip takes, computed from the architecture (not measured): the encoded
    video (visual tokens x hidden size) and its KV prefix (visual tokens plus the text before them,
    in the layers before the first one that reads the question, plus the hidden states entering
    that layer when layers remain); tests/test_reuse.py checks this formula against the cache."""
    arch = architecture(arch_name)
    text = arch.text
    plan = build_plan(preset, text.num_hidden_layers)
    visual = video_token_counts(arch, plan, frames, 0)[0]
    layers = plan.text_free_layers(text.num_hidden_layers)
    prefix = visual + TEXT_BEFORE_VIDEO
    hidden = prefix * text.hidden_size * bytes_per_value if layers < text.num_hidden_layers else 0
    return {"arch": arch_name, "preset": preset, "visual tokens": visual, "layers kept": layers,
            "visual bytes": visual * text.hidden_size * bytes_per_value,
            "prefix bytes": kv_cache_bytes(text, [prefix] * layers, bytes_per_value) + hidden}


def print_memory(presets: list[str], frames: int) -> None:
    mib = 2**20
    print(f"\nMemory per cached clip, computed from the architecture (bf16, {frames} frames, "
          f"{TEXT_BEFORE_VIDEO} text tokens before the video):\n")
    print("| model | preset | visual tokens | layers kept | encoded video MiB | KV prefix MiB | together MiB |")
    print("|---|---|---|---|---|---|---|")
    for arch_name in MEMORY_ARCHS:
        for preset in presets:
            row = cached_clip_bytes(arch_name, preset, frames)
            print(f"| {arch_name} | {preset} | {row['visual tokens']} | {row['layers kept']} | "
                  f"{row['visual bytes'] / mib:.1f} | {row['prefix bytes'] / mib:.1f} | "
                  f"{(row['visual bytes'] + row['prefix bytes']) / mib:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llava-onevision-qwen2-0.5b")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--presets", default="baseline,aim_merge_only,aim_default")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="as aim-llava eval's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--modes", default="off,visual,both", help="the cache modes, in the order they run")
    parser.add_argument("--parts", default="eval,server,memory",
                        help="eval (items/s), server (TTFT), memory (computed bytes per cached clip)")
    parser.add_argument("--checkpoint", type=Path, help="the random checkpoint's folder (kept; default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    modes, parts = args.modes.split(","), args.parts.split(",")
    if sorted(modes) != sorted(MODES):
        parser.error(f"--modes must name each of {', '.join(MODES)} once")
    if not parts or any(part not in PARTS for part in parts):
        parser.error(f"--parts takes {', '.join(PARTS)} (comma-separated)")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if parts == ["memory"]:
        print_memory(presets, args.frames)
        return
    work = Path(tempfile.mkdtemp(prefix="aim_llava_reuse_"))
    checkpoint = args.checkpoint or work / "model"
    if not (checkpoint / "config.json").exists():
        write_random_checkpoint(checkpoint, architecture(args.arch))
    tokenizer, model, processor, _ = load_pretrained_model(checkpoint, device_map=args.device, torch_dtype=args.dtype)
    clips = [write_sample_video(work / f"clip{i}.mp4", num_frames=60 + 15 * i, fps=30, height=360, width=640)
             for i in range(args.clips + 1)]
    items = eval_items(clips[1:], args.questions)

    def llm(**cache) -> VideoLLM:
        return VideoLLM(tokenizer, model, processor, sampling=SamplingOptions(num_frames=args.frames),
                        generation=GenerationOptions(max_new_tokens=args.max_new_tokens), **cache)

    warm = VideoLLM(tokenizer, model, processor, sampling=SamplingOptions(num_frames=1), cache_mb=0)
    warm.ask(str(clips[0]), "Warm up.", max_new_tokens=2)  # one frame: the first call's set-up, not its size
    rows = []
    for preset in presets:
        row = {"preset": preset}
        if "eval" in parts:
            for mode in modes:
                runner = llm(**MODES[mode])
                row[mode] = items_per_second(runner, items, runner.resolve(preset), work / f"{preset}-{mode}.jsonl")
                row[f"{mode} counts"] = runner.cache.stats() if runner.cache is not None else None
                print(f"{preset} {mode}: {row[mode]:.4f} items/s ({counts_cell(row[f'{mode} counts'])})", flush=True)
        if "server" in parts:
            server_llm = llm()
            service = Service(server_llm, work, "m", max_batch_size=1, max_wait_ms=0)
            try:
                row["ttft first s"] = completion_seconds(service, clips[1], QUESTIONS[0], preset)
                row["ttft second s"] = completion_seconds(service, clips[1], QUESTIONS[1], preset)
            finally:
                service.close()
            row["server counts"] = server_llm.cache.stats()
            print(f"{preset} server: first {row['ttft first s']:.2f} s, second {row['ttft second s']:.2f} s",
                  flush=True)
        rows.append(row)
    text = model.config.text
    print(f"\n{checkpoint.name} (LLM of {text.num_hidden_layers} layers, hidden {text.hidden_size}), random weights, "
          f"{args.frames} frames, {args.clips} clips x {args.questions} questions, "
          f"{args.max_new_tokens} new tokens, batch size 1; {machine_name(model.device)}; {args.dtype}\n")
    print_tables(rows)
    if "memory" in parts:
        print_memory(presets, args.frames)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
