"""Captioning many videos one at a time vs in batches, through the real command (aim-llava caption).

    python scripts/bench_batch_caption.py [--model DIR] [--videos 12] [--batch-size 4] [--device cpu]

Without --model it writes the tiny random checkpoint (tests/demos only). Generated sample videos of
different lengths are captioned with --batch-size 1 and with --batch-size N (both with read-ahead
workers); the script prints the wall times, the speedup and whether the greedy texts are equal.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from aim_llava.cli import main
from aim_llava.sample_media import write_sample_video
from aim_llava.tiny_checkpoint import write_tiny_checkpoint


def caption_all(model: str, videos: list[str], batch_size: int, output: Path, extra: list[str]) -> float:
    started = time.perf_counter()
    code = main(["caption", *videos, "--model", model, "--batch-size", str(batch_size), "--output", str(output),
                 *extra])
    if code != 0:
        raise SystemExit(f"aim-llava caption exited with {code}")
    return time.perf_counter() - started


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aim_llava_batch_"))
    model = args.model or str(write_tiny_checkpoint(work / "tiny"))
    videos = [str(write_sample_video(work / f"v{i}.mp4", num_frames=60 + 15 * i, fps=30)) for i in range(args.videos)]
    extra = ["--frames", str(args.frames), "--max-new-tokens", str(args.max_new_tokens), "--device", args.device]
    caption_all(model, videos[:1], 1, work / "warmup.jsonl", extra)
    times, texts = {}, {}
    for size in (1, args.batch_size):
        times[size] = caption_all(model, videos, size, work / f"b{size}.jsonl", extra)
        texts[size] = [json.loads(line)["text"] for line in (work / f"b{size}.jsonl").read_text().splitlines()]
    print(f"| videos | --batch-size 1 s | --batch-size {args.batch_size} s | speedup | same greedy texts |")
    print("|---|---|---|---|---|")
    print(f"| {args.videos} | {times[1]:.1f} | {times[args.batch_size]:.1f} | {times[1] / times[args.batch_size]:.2f}x "
          f"| {texts[1] == texts[args.batch_size]} |")


if __name__ == "__main__":
    main_bench()
