"""The reuse cache on a GPU: same replies as without it (CUDA-graph decoding), and the time to first
token of a first and a second question on the same clip.

    python scripts/check_reuse_gpu.py [--frames 32] [--archs llava-onevision-qwen2-0.5b,llava-onevision-qwen2-7b]

1. The tiny random checkpoint in float32: for each kind of preset, a padded batch of in-memory
   clips asked several questions with 16 new tokens each (so decoding runs as a CUDA graph), with
   the cache (both reuses) and without; the replies must be equal.
2. Random-weight models of the named architectures in bfloat16 (the tiny tokenizer: replies are
   meaningless, timing is not): the wall time of a one-token reply through ``VideoLLM.run`` for a
   clip never seen (cache miss), then for a second question on it (both reuses), then with the
   cache off, after a warm-up on another clip. In-memory clips are recognised by a digest of
   their pixels, which the times include (a file would be recognised by its identity alone).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from aim_llava.architectures import architecture
from aim_llava.bench import machine_name, random_model
from aim_llava.model.builder import load_pretrained_model
from aim_llava.model.image_processor import SiglipImageProcessor
from aim_llava.pipeline import GenerationOptions, Request, SamplingOptions, VideoLLM
from aim_llava.sample_media import random_frames
from aim_llava.tiny_checkpoint import build_tokenizer, write_tiny_checkpoint
from aim_llava.video import VideoClip

PRESETS = ["baseline", "aim_merge_only", "aim_default", "aim_prune_only", "fastv_default", "pool_25",
           "aim_default_mask"]
QUESTIONS = ["What is happening?", "Which colour dominates the scene?", "Who is there, and what do they do?"]


def clip(frames: int, seed: int) -> VideoClip:
    return VideoClip(random_frames(frames, seed=seed), list(range(frames)), [i / 2 for i in range(frames)], frames / 2, 2.0, "memory")


def replies(llm: VideoLLM, clips: list[VideoClip], preset: str) -> list[tuple[str, int]]:
    requests = [Request(c, [(q, None)]) for q in QUESTIONS for c in clips]
    return [(r.response.text, r.response.num_new_tokens) if r.error is None else repr(r.error)
            for r in llm.run(requests, batch_size=2, reduction=preset, max_new_tokens=16)]


def check_equal_replies(frames: int, device: str) -> None:
    tokenizer, model, processor, _ = load_pretrained_model(write_tiny_checkpoint(tempfile.mkdtemp()),
                                                           device_map=device, torch_dtype="float32")
    clips = [clip(frames, seed) for seed in (1, 2, 3)]
    print("| preset | replies | equal with and without the cache | prefix hits:misses |")
    print("|---|---|---|---|")
    for preset in PRESETS:
        cached = VideoLLM(tokenizer, model, processor, sampling=SamplingOptions(num_frames=frames))
        plain = VideoLLM(tokenizer, model, processor, sampling=SamplingOptions(num_frames=frames), cache_mb=0)
        with_cache, without = replies(cached, clips, preset), replies(plain, clips, preset)
        stats = cached.cache.stats()
        print(f"| {preset} | {len(with_cache)} | {with_cache == without} | "
              f"{stats['prefix_hits']}:{stats['prefix_misses']} |", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_token_seconds(llm: VideoLLM, source: VideoClip, question: str, preset: str) -> float:
    synchronize(llm.model.device)
    started = time.perf_counter()
    [result] = llm.run([Request(source, [(question, None)])], reduction=preset, max_new_tokens=1)
    synchronize(llm.model.device)
    if result.error is not None:
        raise result.error
    return time.perf_counter() - started


def time_first_tokens(arch: str, frames: int, presets: list[str], device: str) -> None:
    config = architecture(arch)
    model = random_model(config, torch.device(device), torch.bfloat16)
    tokenizer = build_tokenizer(0)
    model.generation_defaults.eos_token_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    processor = SiglipImageProcessor.from_vision_config(config.vision)
    warm, measured = clip(frames, 0), clip(frames, 5)
    print(f"\n{arch}, bfloat16, {frames} frames, {machine_name(model.device)}\n")
    print("| preset | 1st question s (miss) | 2nd question s (both reuses) | 2nd / 1st | cache off s |")
    print("|---|---|---|---|---|")
    for preset in presets:
        llm = VideoLLM(tokenizer, model, processor, sampling=SamplingOptions(num_frames=frames),
                       generation=GenerationOptions(max_new_tokens=1))
        off = VideoLLM(tokenizer, model, processor, sampling=SamplingOptions(num_frames=frames), cache_mb=0)
        for question in QUESTIONS[:2]:
            one_token_seconds(llm, warm, question, preset)
            one_token_seconds(off, warm, question, preset)
        first = one_token_seconds(llm, measured, QUESTIONS[0], preset)
        second = one_token_seconds(llm, measured, QUESTIONS[1], preset)
        plain = min(one_token_seconds(off, measured, QUESTIONS[1], preset) for _ in range(2))
        print(f"| {preset} | {first:.3f} | {second:.3f} | {second / first:.2f} | {plain:.3f} |", flush=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--archs", default="llava-onevision-qwen2-0.5b,llava-onevision-qwen2-7b")
    parser.add_argument("--presets", default="baseline,aim_merge_only,aim_default")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    check_equal_replies(4, args.device)
    for arch in filter(None, args.archs.split(",")):
        time_first_tokens(arch, args.frames, args.presets.split(","), args.device)


if __name__ == "__main__":
    main()
