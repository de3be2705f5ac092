"""Which reductions the vLLM plugin can run: those that act on video frames between the projector
(after the 2x2 pooling) and the LLM, leaving a fixed number of tokens per frame. Reductions that
act inside the LLM (AIM's pruning, FastV, FitPrune, FiCoCo-L) or inside the vision tower
(FiCoCo-V) need aim-llava's own engine. This module imports no vLLM code."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from aim_llava.model.config import VisionConfig
from aim_llava.reduction.config import ConfigError, available_presets, load_reduction_config
from aim_llava.reduction.plan import ReductionPlan


class UnsupportedReductionError(ConfigError):
    """A reduction that the vLLM plugin cannot run."""


def _unsupported_part(plan: ReductionPlan, num_layers: int) -> str | None:
    """Where ``plan`` acts beyond video frames before the LLM (None: nowhere)."""
    if plan.layer_reducer(num_layers) is not None:
        return "inside the LLM"
    if plan.vision_reducer(VisionConfig()) is not None:
        return "inside the vision tower"
    probe = torch.zeros(8, 4)
    if plan.reduce_image_tokens(probe).shape != probe.shape:
        return "on image tokens"
    return None


@functools.cache
def supported_presets(num_layers: int) -> tuple[str, ...]:
    """The shipped presets the plugin runs for an LLM of ``num_layers`` layers."""
    return tuple(name for name in available_presets()
                 if _unsupported_part(load_reduction_config(name).build(num_layers), num_layers) is None)


def frame_reduction_plan(spec: str | Path | dict, num_layers: int) -> ReductionPlan:
    """The plan of ``spec`` (a preset name, YAML path or mapping) for an LLM of ``num_layers``
    layers, if it acts only on video frames before the LLM; otherwise an error naming the preset."""
    config = load_reduction_config(spec)
    plan = config.build(num_layers)
    part = _unsupported_part(plan, num_layers)
    if part is not None:
        raise UnsupportedReductionError(
            f"reduction {config.name!r} (method {config.method!r}) acts {part}, which aim-llava's vLLM plugin "
            f"cannot run: use one that reduces video frames before the LLM "
            f"({', '.join(supported_presets(num_layers))}) or aim-llava's own engine"
        )
    return plan


@functools.lru_cache(maxsize=32)
def _cached_plan(spec_json: str, num_layers: int) -> ReductionPlan:
    return frame_reduction_plan(json.loads(spec_json), num_layers)


def plan_from_hf_config(hf_config, key: str) -> ReductionPlan:
    """The plan named by ``hf_config.<key>`` (set through vLLM's ``hf_overrides``), built once per
    setting and LLM depth."""
    spec = getattr(hf_config, key, None)
    if spec is None:
        raise UnsupportedReductionError(
            f"the aim-llava architecture needs a reduction: add \"{key}\": \"<preset>\" to hf_overrides "
            f"(e.g. \"aim_merge_only\")"
        )
    if not isinstance(spec, (str, dict)):
        raise UnsupportedReductionError(f"hf_overrides[{key!r}] must be a preset name, a YAML path or a mapping, "
                                        f"got {type(spec).__name__}")
    return _cached_plan(json.dumps(spec, sort_keys=True), hf_config.text_config.num_hidden_layers)
