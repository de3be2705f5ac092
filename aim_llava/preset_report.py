"""What a reduction preset does, shown: ``aim-llava presets [NAME]``.

The list gives each preset's description (the comment at the top of its YAML file) and its LLM
prefill FLOPs against the baseline's for an architecture and frame count; one preset's report
adds its YAML, the visual tokens entering each LLM layer and the FLOPs. The numbers are the
analytic ones of :mod:`aim_llava.flops` (the paper's accounting), for a video prompt.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from aim_llava.flops import flops_report
from aim_llava.model.config import LlavaConfig
from aim_llava.reduction.budget import resolve_reduction
from aim_llava.reduction.config import available_presets, load_reduction_config, preset_files

DEFAULT_ARCH = "llava-onevision-qwen2-7b"
DEFAULT_FRAMES = 32
DEFAULT_TEXT_TOKENS = 100


@dataclass
class PresetReport:
    """One reduction on one architecture, frame count and text length."""

    name: str
    description: str
    yaml: str
    arch: str
    frames: int
    text_tokens: int
    visual_tokens_per_layer: list[int]
    baseline_visual_tokens: int
    prefill_tflops: float
    baseline_prefill_tflops: float

    @property
    def prefill_flops_fraction(self) -> float:
        return self.prefill_tflops / self.baseline_prefill_tflops

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "prefill_flops_fraction": self.prefill_flops_fraction})


def preset_text(spec: str) -> str:
    """The YAML text of a preset name or YAML path; for other specs (``budget:X``,
    ``fitprune:R.json``) an empty string."""
    presets = preset_files()
    if spec in presets:
        return presets[spec].read_text()
    if Path(spec).suffix in (".yaml", ".yml"):
        load_reduction_config(spec)  # a missing or broken file is one clear error
        return Path(spec).read_text()
    return ""


def description(text: str) -> str:
    """The comment lines at the top of a YAML file, as one paragraph."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(line for line in lines if line)


def preset_report(spec: str, arch_name: str, arch: LlavaConfig, frames: int,
                  text_tokens: int = DEFAULT_TEXT_TOKENS) -> PresetReport:
    """What ``spec`` (a preset name, YAML path, ``budget:X`` or ``fitprune:R.json``) does on
    ``arch`` for a video of ``frames`` frames and ``text_tokens`` text tokens."""
    config = resolve_reduction(spec, arch, frames, text_tokens)
    text = preset_text(spec)
    if not text:
        options = {"name": config.name, "method": config.method, **dataclasses.asdict(config.options)}
        text = yaml.safe_dump(options, sort_keys=False)
    report = flops_report(arch_name, arch, config, frames, text_tokens)
    baseline = flops_report(arch_name, arch, load_reduction_config("baseline"), frames, text_tokens)
    return PresetReport(
        name=config.name, description=description(text), yaml=text, arch=arch_name, frames=frames,
        text_tokens=text_tokens, visual_tokens_per_layer=[n - text_tokens for n in report.tokens_per_layer],
        baseline_visual_tokens=baseline.visual_tokens, prefill_tflops=report.prefill_tflops,
        baseline_prefill_tflops=baseline.prefill_tflops,
    )


def layer_runs(counts: list[int]) -> list[tuple[int, int, int]]:
    """(first layer, last layer, count) for each run of layers with the same count."""
    runs: list[tuple[int, int, int]] = []
    for layer, count in enumerate(counts):
        if runs and runs[-1][2] == count:
            runs[-1] = (runs[-1][0], layer, count)
        else:
            runs.append((layer, layer, count))
    return runs


def format_preset(report: PresetReport) -> str:
    """A preset's YAML, then its schedule and FLOPs, for reading."""
    schedule = ", ".join(f"{'layer' if first == last else 'layers'} {first}"
                         f"{'' if first == last else f'-{last}'}: {count}"
                         for first, last, count in layer_runs(report.visual_tokens_per_layer))
    return "\n".join([
        report.yaml.rstrip(),
        "",
        f"On {report.arch}, {report.frames} frames, {report.text_tokens} text tokens:",
        f"  visual tokens entering the LLM: {report.visual_tokens_per_layer[0]} of the baseline's "
        f"{report.baseline_visual_tokens}",
        f"  visual tokens entering each layer: {schedule}",
        f"  LLM prefill: {report.prefill_tflops:.2f} TFLOPs, {100 * report.prefill_flops_fraction:.1f}% of the "
        f"baseline's {report.baseline_prefill_tflops:.2f} (paper accounting; aim-llava flops for more)",
    ])


def preset_reports(arch_name: str, arch: LlavaConfig, frames: int,
                   text_tokens: int = DEFAULT_TEXT_TOKENS) -> list[PresetReport]:
    """Every installed preset's report, in name order."""
    return [preset_report(name, arch_name, arch, frames, text_tokens) for name in available_presets()]


def format_list(reports: list[PresetReport]) -> str:
    """One line a preset: name, prefill FLOPs against the baseline, description."""
    width = max(len(report.name) for report in reports)
    first = reports[0]
    lines = [f"LLM prefill FLOPs against the baseline's on {first.arch}, {first.frames} frames, {first.text_tokens} "
             "text tokens (aim-llava presets NAME: one's YAML and visual tokens per layer):"]
    lines += [f"{report.name:<{width}}  {100 * report.prefill_flops_fraction:4.0f}%  {report.description}"
              for report in reports]
    return "\n".join(lines)


def markdown_table(reports: list[PresetReport]) -> str:
    """The presets as the README's table."""
    first = reports[0]
    lines = [f"| preset | LLM prefill FLOPs ({first.arch.removeprefix('llava-onevision-qwen2-')}, "
             f"{first.frames} frames) | what it does |", "|---|---|---|"]
    lines += [f"| `{report.name}` | {100 * report.prefill_flops_fraction:.0f}% | {report.description} |"
              for report in reports]
    return "\n".join(lines)
