"""Adaptive inference: pick the least aggressive AIM setting whose prefill fits a FLOPs budget.

``budget:0.15`` means 15% of the baseline's prefill FLOPs; ``budget:20tflops`` an absolute 20
TFLOPs. Candidates are AIM's published merge ratios (none, 1/2 ... 1/64) combined with no
pruning or the published 12.5%-per-layer schedule starting at any layer. The choice is the
candidate with the most prefill FLOPs (paper accounting, see ``aim_llava.flops``) within the
budget; among equals, the one that merges least.
"""

from __future__ import annotations

import re

from aim_llava.errors import AimLlavaError
from aim_llava.model.config import LlavaConfig
from aim_llava.reduction.config import ReductionConfig, load_reduction_config
from aim_llava.reduction.methods.aim import AimOptions

MERGE_RATIOS = (None, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625)
DEFAULT_TEXT_TOKENS = 100


class BudgetError(AimLlavaError):
    """A budget that cannot be parsed or met."""


def parse_budget(spec: str) -> tuple[float, bool]:
    """'budget:0.15' -> (0.15, False); 'budget:20tflops' -> (20.0, True)."""
    match = re.fullmatch(r"budget:\s*([0-9]*\.?[0-9]+)\s*(tflops)?", spec.strip(), flags=re.IGNORECASE)
    if not match:
        raise BudgetError(f"cannot read {spec!r}: use budget:FRACTION (e.g. budget:0.15) or budget:NUMtflops")
    value, absolute = float(match.group(1)), match.group(2) is not None
    if value <= 0 or (not absolute and value > 1):
        raise BudgetError(f"{spec!r}: a fraction must lie in (0, 1], an absolute budget must be positive")
    return value, absolute


def candidates(num_layers: int) -> list[ReductionConfig]:
    configs = []
    for ratio in MERGE_RATIOS:
        for start in [None, *range(num_layers - 1, -1, -1)]:
            options = AimOptions(merge_ratio=ratio, prune=None if start is None else "published", prune_start=start)
            label = f"merge {ratio or 1:g}" + ("" if start is None else f", prune from layer {start}")
            configs.append(ReductionConfig(f"budget ({label})", "aim", options))
    return configs


def solve_budget(spec: str, arch: LlavaConfig, frames: int, text_tokens: int = DEFAULT_TEXT_TOKENS) -> ReductionConfig:
    """The least aggressive candidate whose prefill TFLOPs meet the budget."""
    from aim_llava.flops import flops_report

    value, absolute = parse_budget(spec)
    baseline = flops_report("", arch, load_reduction_config("baseline"), frames, text_tokens).prefill_tflops
    limit = value if absolute else value * baseline
    best, best_cost = None, -1.0
    for config in candidates(arch.text.num_hidden_layers):
        cost = flops_report("", arch, config, frames, text_tokens).prefill_tflops
        if cost <= limit + 1e-9 and cost > best_cost:
            best, best_cost = config, cost
    if best is None:
        raise BudgetError(f"{spec}: no AIM setting fits {limit:.2f} TFLOPs for {frames} frames (baseline {baseline:.2f})")
    return best


def is_budget(spec) -> bool:
    """Whether ``spec`` is a ``budget:...`` spec (solved for a model and frame count)."""
    return isinstance(spec, str) and spec.strip().lower().startswith("budget:")


def check_reduction_spec(spec) -> None:
    """Fail early on a spec that cannot work (before any model is loaded)."""
    if is_budget(spec):
        parse_budget(spec)
    else:
        load_reduction_config(spec)


def resolve_reduction(spec, arch: LlavaConfig, frames: int, text_tokens: int = DEFAULT_TEXT_TOKENS) -> ReductionConfig:
    """Like :func:`load_reduction_config`, and ``budget:...`` solved for this model and frame count."""
    if is_budget(spec):
        return solve_budget(spec, arch, frames, text_tokens)
    return load_reduction_config(spec)
