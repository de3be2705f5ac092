#!/usr/bin/env python
"""How far the model's own PageRank importance is from the float32 computation, per pruning layer,
on the benchmark's inputs (a random-weight architecture, synthetic frames, 100 text tokens).

    python scripts/importance_overlap.py --arch llava-onevision-qwen2-7b --frames 32 [--dtype bfloat16]
                                         [--device cpu] [--config aim_default] [--json out.json]

One prefill with the preset; at every layer where it prunes, the layer's rotated q and k are
scored twice: by the kernel the model runs (``importance_kernel: auto`` picks it by device and
dtype) and by the float32 log-space reference (the chunked kernel on float32 copies of the same q
and k). Printed per layer: tokens, visual tokens kept, the share of the reference's kept set that
the model also keeps, the largest difference of the log-scores, both times, and the extra peak
memory of the model's importance call. Prints a Markdown table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch

from aim_llava.architectures import architecture
from aim_llava.bench import PeakMemory, machine_name, random_model
from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.model.image_processor import SiglipImageProcessor
from aim_llava.reduction.budget import resolve_reduction
from aim_llava.reduction.importance import auto_kernel, log_importance, log_start_weights
from aim_llava.reduction.methods.aim import AimPruner
from aim_llava.reduction.tokens import keep_top_visual
from aim_llava.sample_media import random_frames


@dataclass
class LayerOverlap:
    layer: int
    tokens: int
    visual_kept: int
    overlap: float
    max_abs_diff: float
    model_ms: float
    reference_ms: float
    model_peak_mib: float


def kept_overlap(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of the reference's kept tokens (a boolean mask) that ``ours`` also keeps; 1.0
    where the reference keeps none (a layer that drops every visual token: both keep none)."""
    chosen = int(reference.sum())
    return int((ours & reference).sum()) / chosen if chosen else 1.0


def timed(call):
    started = time.perf_counter()
    result = call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, (time.perf_counter() - started) * 1000


class OverlapTap:
    """Wraps :meth:`AimPruner.after_layer`: at every pruning layer, the kept sets from the model's
    scores and from the float32 reference, before the pruner goes on with its own."""

    def __init__(self):
        self.rows: list[LayerOverlap] = []
        self.original = AimPruner.after_layer

    def __enter__(self) -> OverlapTap:
        tap = self

        def after_layer(pruner, layer, state, attention):
            if pruner.schedule.prunes_after(layer):
                tap.compare(pruner, layer, state, attention)
            return tap.original(pruner, layer, state, attention)

        AimPruner.after_layer = after_layer
        return self

    def __exit__(self, *exc) -> None:
        AimPruner.after_layer = self.original

    def compare(self, pruner: AimPruner, layer: int, state, attention) -> None:
        options = pruner.options
        log_start = log_start_weights(state.valid)
        with PeakMemory(state.hidden.device) as memory:
            ours, model_ms = timed(lambda: pruner.importance(state, attention))
        reference, reference_ms = timed(lambda: log_importance(
            attention.q.float(), attention.k.float(), state.alive, log_start, attention.scale,
            options.importance_temperature, options.importance_iterations, kernel="chunked"))
        wanted = [pruner.schedule.kept(layer, visual) for visual in state.num_visual]
        keep_ours, kept = keep_top_visual(state, ours, wanted)
        keep_reference, _ = keep_top_visual(state, reference, wanted)
        candidates = state.visual & state.alive
        chosen = keep_reference & candidates
        seen = torch.isfinite(reference) & state.alive
        self.rows.append(LayerOverlap(
            layer=layer, tokens=int(state.hidden.shape[1]), visual_kept=int(chosen.sum()),
            overlap=kept_overlap(keep_ours & candidates, chosen),
            max_abs_diff=float((ours.float() - reference)[seen].abs().max()) if bool(seen.any()) else 0.0,
            model_ms=model_ms, reference_ms=reference_ms, model_peak_mib=memory.extra / 2**20))


def measure(model, config: str, frames: int, text_tokens: int = 100) -> list[LayerOverlap]:
    """One prefill of ``frames`` synthetic frames and a ``text_tokens`` prompt with ``config``; the
    per-layer comparison."""
    torch.manual_seed(0)
    processor = SiglipImageProcessor.from_vision_config(model.config.vision)
    pixels = processor.preprocess_frames(random_frames(frames), model.device, model.dtype)
    text = torch.randint(0, min(1000, model.config.text.vocab_size), (text_tokens,))
    ids = torch.cat([text[:14], torch.tensor([IMAGE_TOKEN_INDEX]), text[14:]])[None].to(model.device)
    reduction = resolve_reduction(config, model.config, frames, text_tokens).build(model.config.text.num_hidden_layers)
    with torch.no_grad(), OverlapTap() as tap:
        model(ids, images=[pixels], modalities=["video"], reduction=reduction)
    return tap.rows


def markdown(rows: list[LayerOverlap]) -> str:
    lines = ["| layer | tokens | visual kept | overlap with float32 | max abs. log-score diff | model ms | "
             "float32 ms | model peak MiB |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.layer} | {r.tokens} | {r.visual_kept} | {100 * r.overlap:.2f}% | {r.max_abs_diff:.2e} | "
              f"{r.model_ms:.0f} | {r.reference_ms:.0f} | {r.model_peak_mib:.0f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llava-onevision-qwen2-0.5b", help="named architecture, random weights")
    parser.add_argument("--frames", type=int, default=32, help="synthetic 640x360 frames (default: 32)")
    parser.add_argument("--config", default="aim_default", help="an AIM preset that prunes (default: aim_default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = random_model(architecture(args.arch), device, dtype)
    rows = measure(model, args.config, args.frames)
    print(f"{args.arch}, {args.frames} frames, {args.config}, {args.dtype} on {machine_name(device)}; model kernel "
          f"'{auto_kernel(device, dtype)}' vs float32 chunked; torch {torch.__version__}")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"arch": args.arch, "frames": args.frames, "config": args.config, "dtype": args.dtype,
                       "device": machine_name(device), "rows": [asdict(row) for row in rows]}, out, indent=1)


if __name__ == "__main__":
    main()
