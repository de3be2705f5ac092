"""Speed measurement of reduction configs, next to their analytic FLOPs (``aim-llava bench``).

A model of a named architecture with random weights (speed does not depend on weight values) or
a loaded checkpoint; synthetic frames or a real video. Every stage is timed warm (after a warm-up
round), as the median of the repeats, with CUDA events on a GPU (no synchronisation inside the
measured code) and the clock on the CPU:

* read: sampling the frames from ``--video`` (on the host), and preprocess: resizing and
  normalising them on the model's device (without a video, synthetic frames of the family's bench
  size: 640x360 for LLaVA-OneVision, 448x448 for Qwen2.5-VL);
* vision: the tower and projector (once per repeat, shared by the configs that do not act inside
  the tower; each config that does, FiCoCo-V, has its own);
* pre-LLM: pooling and merging before the LLM;
* prefill: the LLM's pass over the prompt, and inside it the PageRank importance;
* decode: the generation after the prefill, as tokens per second over the batch, without the
  one-off capture of the decoding step as a CUDA graph on a GPU (given apart: the step it runs
  eagerly, the capture and its check);
* the KV cache's buffers (every layer's own length after pruning plus room for the new tokens);
* peak memory of the generation (CUDA max allocated on GPU, sampled RSS on CPU).

Configs run alternating, so slow drifts of the machine affect all of them alike.
"""

from __future__ import annotations

import ctypes
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.cost import prefill_flops
from aim_llava.flops import executed_tokens
from aim_llava.model.families import family_of
from aim_llava.model.language_model.generation import STEPS_IN_GRAPH_CAPTURE
from aim_llava.model.language_model.llava_qwen import Qwen2MultimodalForCausalLM
from aim_llava.reduction.budget import resolve_reduction
from aim_llava.reduction.plan import ReductionPlan
from aim_llava.sample_media import random_frames
from aim_llava.timing import StageTimes, stage
from aim_llava.video import VideoClip, load_video


def release_freed_memory() -> None:
    """Hand memory that glibc keeps after frees back to the OS, so RSS growth shows new peaks."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Extra peak memory of a block: CUDA max allocated; on Linux the kernel's peak RSS (VmHWM,
    reset on entry through /proc/self/clear_refs), elsewhere RSS sampled every millisecond by a
    thread (which competes with the measured code for the CPU and the GIL)."""

    CLEAR_REFS = Path("/proc/self/clear_refs")
    STATUS = Path("/proc/self/status")

    def __init__(self, device: torch.device):
        self.device = device
        self.thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        release_freed_memory()
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        try:
            self.CLEAR_REFS.write_text("5")  # the peak RSS restarts from the current RSS
        except OSError:
            self.running = True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.thread is None:
            peak_kib = re.search(r"VmHWM:\s*(\d+) kB", self.STATUS.read_text()).group(1)
            self.extra = int(peak_kib) * 1024 - self.base
        else:
            self.running = False
            self.thread.join()
            self.extra = self.peak - self.base


@dataclass
class ConfigResult:
    config: str
    tokens_per_layer: list[int]
    prefill_tflops: float
    prefill_tflops_executed: float
    read_s: float
    preprocess_s: float
    vision_s: float
    pre_llm_s: float
    prefill_s: float
    ttft_s: float
    decode_tokens_per_s: float
    graph_capture_s: float
    importance_s: float
    peak_extra_mib: float
    kv_cache_mib: float
    flops_reduction: float = 1.0
    speedup: float = 1.0
    speedup_over_flops_reduction: float = 1.0


@dataclass
class BenchReport:
    arch: str
    frames: int
    text_tokens: int
    decode_tokens: int
    batch: int
    device: str
    machine: str
    dtype: str
    attn: str
    repeats: int
    torch: str
    source: str
    rows: list[ConfigResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {psutil.cpu_count()} CPUs"


def random_model(config, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa",
                 seed: int = 0) -> Qwen2MultimodalForCausalLM:
    """A model of this architecture (any family) with random weights (speed does not depend on the
    values)."""
    with torch.device("meta"):
        model = family_of(config).build_model(config, attn_implementation)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: the device never holds float32 weights
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    if config.text.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def timed_vision(model, pixels: torch.Tensor, plan) -> tuple[torch.Tensor, float]:
    """The tower and projector over the frames, and their time."""
    with torch.no_grad(), StageTimes() as times:
        features = model.encode_images(pixels, plan)
    return features, times.seconds()["vision"]


def measure_config(model, plan, frame_features, ids, decode_tokens: int, batch: int, cuda_graph: bool) -> dict:
    """One warm run of one config: pre-LLM step, prefill with its importance, decode, memory."""
    with torch.no_grad(), StageTimes() as times, PeakMemory(model.device) as memory:
        features = model.video_features(frame_features, plan)
        output = model.generate(ids.expand(batch, -1), visual_features=[features] * batch, max_new_tokens=decode_tokens,
                                eos_token_id=[], reduction=plan, return_dict_in_generate=True, cuda_graph=cuda_graph)
    seconds = times.seconds()
    return {
        "pre_llm_s": seconds["pre_llm"],
        "prefill_s": seconds["prefill"],
        "importance_s": seconds.get("importance", 0.0),
        "decode_tokens_per_s": decode_rate(seconds, output.sequences.shape[1] - 1, batch),
        "graph_capture_s": seconds.get("graph_capture", 0.0),
        "peak_extra_mib": memory.extra / 2**20,
        "kv_cache_mib": output.kv_cache_bytes / 2**20,
        "tokens_per_layer": [n[0] for n in output.reduction.visual_tokens_per_layer],
    }


def decode_rate(seconds: dict[str, float], steps: int, batch: int) -> float:
    """Tokens per second over the batch of ``steps`` decoding steps timed as stage ``decode``, less
    the ``graph_capture`` stage inside it and the steps that stage ran (the captured one and the
    check's; 0 without steps beyond them)."""
    captured = STEPS_IN_GRAPH_CAPTURE if "graph_capture" in seconds else 0
    if steps <= captured:
        return 0.0
    return batch * (steps - captured) / (seconds["decode"] - seconds.get("graph_capture", 0.0))


def read_frames(video: str | None, frames: int, backend: str, family) -> tuple[VideoClip, float]:
    """The sampled frames of ``video`` (by the family's frame rule) and the time reading them
    took, or synthetic frames of the family's bench size at 2 frames a second (read time 0)."""
    if video is None:
        height, width = family.bench_frame_size
        times = [index / 2 for index in range(frames)]
        return VideoClip(random_frames(frames, height, width), list(range(frames)), times, frames / 2, 2.0,
                         "synthetic", sampled_fps=2.0), 0.0
    started = time.perf_counter()
    clip = load_video(video, num_frames=frames, backend=backend, frame_rule=family.sampling({}).get("frame_rule",
                                                                                                    "llava"))
    return clip, time.perf_counter() - started


def timed_preprocess(model, processor, clip: VideoClip):
    """The clip's pixel input, made as the family makes it, and the time it took."""
    with torch.no_grad(), StageTimes() as times, stage("preprocess", model.device):
        pixels, _, _ = family_of(model.config).preprocess(clip, processor, model)
    return pixels, times.seconds()["preprocess"]


def run_bench(model, arch_name: str, configs: list[str], frames: int = 16, text_tokens: int = 100,
              decode_tokens: int = 16, repeats: int = 3, video: str | None = None, backend: str = "auto",
              batch: int = 1, cuda_graph: bool = True, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Measure every config in one process, alternating, after one warm-up round; ``batch``
    copies of the prompt are generated together. With ``video`` the frames are read from it
    (timed) every repeat; otherwise synthetic 640x360 frames are used. ``progress`` is told of
    each measurement done (``(repeats + 1) * len(configs)`` of them), by its round and config."""
    device, config = model.device, model.config
    family = family_of(config)
    torch.manual_seed(0)
    processor = family.image_processor(config)
    text = torch.randint(0, min(1000, config.text.vocab_size), (text_tokens,))
    ids = torch.cat([text[:14], torch.tensor([IMAGE_TOKEN_INDEX]), text[14:]])[None]
    reductions = [resolve_reduction(spec, config, frames, text_tokens) for spec in configs]
    plans = [reduction.build(config.text.num_hidden_layers) for reduction in reductions]
    # configs that do not act inside the tower share one vision pass per repeat
    tower_owner = [index if plan.vision_reducer(config.vision) is not None else None
                   for index, plan in enumerate(plans)]
    samples: dict[int, list[dict]] = {i: [] for i in range(len(plans))}
    for repeat in range(repeats + 1):
        raw, read_s = read_frames(video, frames, backend, family)
        pixels, preprocess_s = timed_preprocess(model, processor, raw)
        shared, shared_s = timed_vision(model, pixels, ReductionPlan())
        for index, plan in enumerate(plans):
            features, vision_s = (shared, shared_s) if tower_owner[index] is None else timed_vision(model, pixels, plan)
            result = measure_config(model, plan, features, ids, decode_tokens, batch, cuda_graph)
            if repeat > 0:
                samples[index].append({**result, "vision_s": vision_s, "read_s": read_s, "preprocess_s": preprocess_s})
            if progress is not None:
                progress(f"{'warm-up' if repeat == 0 else f'round {repeat}/{repeats}'}: {reductions[index].name}")
    frames = len(raw.indices)
    height, width = raw.frames.shape[1:3]
    report = BenchReport(arch_name, frames, text_tokens, decode_tokens, batch, str(device), machine_name(device),
                         str(model.dtype).replace("torch.", ""), model.model.attn_implementation, repeats,
                         torch.__version__, video or f"synthetic {width}x{height} frames")
    for index, reduction in enumerate(reductions):
        runs = samples[index]

        def median(key: str) -> float:
            return statistics.median(run[key] for run in runs)

        entering = [n + text_tokens for n in runs[0]["tokens_per_layer"]]
        plan = plans[index]
        visual = runs[0]["tokens_per_layer"][0]
        leaving = [plan.visual_tokens_leaving(layer, visual) + text_tokens for layer in range(len(entering))]
        report.rows.append(ConfigResult(
            config=reduction.name,
            tokens_per_layer=entering,
            prefill_tflops=prefill_flops(config.text, leaving) / 1e12,
            prefill_tflops_executed=prefill_flops(config.text, executed_tokens(plan, entering)) / 1e12,
            read_s=median("read_s"),
            preprocess_s=median("preprocess_s"),
            vision_s=median("vision_s"),
            pre_llm_s=median("pre_llm_s"),
            prefill_s=median("prefill_s"),
            ttft_s=sum(median(key) for key in ("read_s", "preprocess_s", "vision_s", "pre_llm_s", "prefill_s")),
            decode_tokens_per_s=median("decode_tokens_per_s"),
            graph_capture_s=median("graph_capture_s"),
            importance_s=median("importance_s"),
            peak_extra_mib=median("peak_extra_mib"),
            kv_cache_mib=median("kv_cache_mib"),
        ))
    base = report.rows[0]
    for row in report.rows:
        row.flops_reduction = base.prefill_tflops_executed / row.prefill_tflops_executed
        row.speedup = base.prefill_s / row.prefill_s
        row.speedup_over_flops_reduction = row.speedup / row.flops_reduction
    return report


def markdown(report: BenchReport) -> str:
    lines = [
        f"{report.arch}, {report.frames} frames, {report.text_tokens} text tokens, {report.decode_tokens} new tokens, "
        f"batch {report.batch}; frames from {report.source}; {report.machine}; {report.dtype}, attention "
        f"{report.attn}; torch {report.torch}; every stage timed warm, median of {report.repeats} after a warm-up; "
        "TTFT = read + preprocess + vision + pre-LLM + prefill",
        "",
        "| config | tokens in layer 0 / last | TFLOPs paper / executed | FLOPs reduction | prefill s | speedup | "
        "speedup / FLOPs red. | importance s (share) | read s | preprocess s | vision s | pre-LLM s | TTFT s | "
        "decode tok/s | graph capture s | KV cache MiB | peak extra MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.config} | {r.tokens_per_layer[0]} / {r.tokens_per_layer[-1]} | "
            f"{r.prefill_tflops:.2f} / {r.prefill_tflops_executed:.2f} | {r.flops_reduction:.2f}x | {r.prefill_s:.3f} | "
            f"{r.speedup:.2f}x | {r.speedup_over_flops_reduction:.2f} | "
            f"{r.importance_s:.3f} ({100 * r.importance_s / r.prefill_s:.1f}%) | {r.read_s:.3f} | "
            f"{r.preprocess_s:.3f} | {r.vision_s:.3f} | {r.pre_llm_s:.3f} | {r.ttft_s:.3f} | "
            f"{r.decode_tokens_per_s:.1f} | {r.graph_capture_s:.3f} | {r.kv_cache_mib:.1f} | {r.peak_extra_mib:.0f} |"
        )
    return "\n".join(lines)


def plot(report: BenchReport, path: str) -> None:
    """FLOPs and measured prefill time per config, and tokens per layer (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from aim_llava.errors import AimLlavaError

        raise AimLlavaError("--plot needs matplotlib: pip install '.[plot]'") from None
    names = [r.config for r in report.rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(names))
    left.bar([i - 0.2 for i in x], [r.prefill_tflops_executed for r in report.rows], width=0.4, label="TFLOPs")
    left.set_ylabel("prefill TFLOPs (executed)")
    twin = left.twinx()
    twin.bar([i + 0.2 for i in x], [r.prefill_s for r in report.rows], width=0.4, color="tab:orange", label="seconds")
    twin.set_ylabel("measured prefill s")
    left.set_xticks(list(x), names, rotation=20, ha="right")
    left.set_title("analytic cost vs measured time")
    for r in report.rows:
        right.plot(range(len(r.tokens_per_layer)), r.tokens_per_layer, label=r.config)
    right.set_xlabel("LLM layer")
    right.set_ylabel("tokens entering the layer")
    right.legend(fontsize=8)
    fig.suptitle(f"{report.arch}, {report.frames} frames, {report.machine}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
