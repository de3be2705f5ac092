"""FLOPs reports of a video prompt under a reduction config (formulas in :mod:`aim_llava.cost`).

Two per-layer token lists are reported:

* ``tokens_per_layer``: the tokens that ENTER each LLM layer (the decision made with layer l's
  attention applies from layer l + 1); this is what remove mode executes, while mask mode keeps
  computing every row (its executed cost uses the full length);
* ``paper_tokens_per_layer``: each layer charged with the tokens that LEAVE it (kept after it),
  the convention that reproduces the published figures (LLaVA-OV-7B, 32 frames, 100 text
  tokens: 99.63 and 14.76 TFLOPs).

``prefill_tflops`` uses the paper's convention; ``prefill_tflops_executed`` the executed one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from aim_llava.architectures import ARCHITECTURES, architecture
from aim_llava.cost import decode_flops, kv_cache_bytes, prefill_flops
from aim_llava.errors import AimLlavaError
from aim_llava.model.families import family_of, read_config_file
from aim_llava.reduction.config import ReductionConfig


@dataclass
class FlopsReport:
    arch: str
    config: str
    frames: int
    text_tokens: int
    visual_tokens: int
    tokens_per_layer: list[int]
    paper_tokens_per_layer: list[int]
    prefill_tflops: float
    prefill_tflops_executed: float
    vision_tflops: float
    projector_tflops: float
    decode_gflops_per_token: float
    lm_head_gflops_per_token: float
    kv_cache_mib: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def video_token_counts(arch, plan, frames: int, text_tokens: int):
    """(visual tokens, tokens entering each layer, tokens leaving each layer) for a video prompt
    under a built reduction plan, as the architecture's family counts them."""
    return family_of(arch).video_token_counts(arch, plan, frames, text_tokens)


def executed_tokens(plan, entering: list[int]) -> list[int]:
    """Rows each layer really computes: in mask mode the hidden states keep their full length."""
    return [entering[0]] * len(entering) if plan.prune_mode == "mask" else entering


def resolve_architecture(name_or_path: str):
    """(name, config) of a named architecture or of a checkpoint's config.json (any family)."""
    if name_or_path in ARCHITECTURES:
        return name_or_path, architecture(name_or_path)
    path = Path(name_or_path)
    if os.path.isdir(path):
        path = path / "config.json"
    if not os.path.isfile(path):
        raise AimLlavaError(
            f"unknown architecture {name_or_path!r}: give one of {', '.join(ARCHITECTURES)} or a config.json path"
        )
    return str(path), read_config_file(path)


def flops_report(arch_name: str, arch, reduction: ReductionConfig, frames: int, text_tokens: int,
                 bytes_per_value: int = 2) -> FlopsReport:
    if frames < 1 or text_tokens < 0:
        raise AimLlavaError(f"frames must be >= 1 and text tokens >= 0, got {frames} and {text_tokens}")
    plan = reduction.build(arch.text.num_hidden_layers)
    family = family_of(arch)
    family.check_reduction(plan)
    visual, entering, leaving = family.video_token_counts(arch, plan, frames, text_tokens)
    executed = executed_tokens(plan, entering)
    text = arch.text
    return FlopsReport(
        arch=arch_name,
        config=reduction.name,
        frames=frames,
        text_tokens=text_tokens,
        visual_tokens=visual,
        tokens_per_layer=entering,
        paper_tokens_per_layer=leaving,
        prefill_tflops=prefill_flops(text, leaving) / 1e12,
        prefill_tflops_executed=prefill_flops(text, executed) / 1e12,
        vision_tflops=family.vision_flops(arch, plan, frames) / 1e12,
        projector_tflops=family.projector_flops(arch, frames) / 1e12,
        decode_gflops_per_token=decode_flops(text, executed) / 1e9,
        lm_head_gflops_per_token=2 * text.hidden_size * text.vocab_size / 1e9,
        kv_cache_mib=kv_cache_bytes(text, executed, bytes_per_value) / 2**20,
    )


def record_cost(arch, result) -> dict:
    """What reduction did for one answered item (``result``: a pipeline Result; ``arch``: the model's
    config, of any family), as the fields of
    its results record: the visual tokens entering each LLM layer (counted in the run), and for a
    video the LLM prefill FLOPs against the baseline's for the same frames and text (the paper's
    accounting; None for an image, whose tiling the formula does not follow, and for a family whose
    frames keep their native resolution, which the formula counts at one fixed size)."""
    response, visual = result.response, result.visual
    fraction = None
    if visual.modality == "video" and not family_of(arch).native_resolution:
        frames, text = len(visual.clip.indices), response.prompt_tokens - response.visual_tokens
        cost = flops_report("", arch, visual.reduction, frames, text).prefill_tflops
        baseline = flops_report("", arch, ReductionConfig(), frames, text).prefill_tflops
        fraction = round(cost / baseline, 4)
    return {"visual_tokens_per_layer": [layer[0] for layer in response.reduction.visual_tokens_per_layer],
            "prefill_flops_fraction": fraction}


def format_report(report: FlopsReport) -> str:
    """A readable table."""
    rows = [
        ("architecture", report.arch),
        ("config", report.config),
        ("frames / visual tokens / text tokens", f"{report.frames} / {report.visual_tokens} / {report.text_tokens}"),
        ("LLM prefill (paper accounting)", f"{report.prefill_tflops:.2f} TFLOPs"),
        ("LLM prefill (as executed)", f"{report.prefill_tflops_executed:.2f} TFLOPs"),
        ("vision tower", f"{report.vision_tflops:.2f} TFLOPs"),
        ("projector", f"{report.projector_tflops:.3f} TFLOPs"),
        ("decode, per token (+ LM head)", f"{report.decode_gflops_per_token:.2f} (+ {report.lm_head_gflops_per_token:.2f}) GFLOPs"),
        ("KV cache after prefill", f"{report.kv_cache_mib:.1f} MiB"),
        ("tokens entering each layer", " ".join(map(str, report.tokens_per_layer))),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
