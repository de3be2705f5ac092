"""Which reductions the vLLM plugin can run, and how many tokens they leave.

Accepted: those that act on video frames between the projector (after the 2x2 pooling) and the
LLM, leaving a fixed number of tokens per frame. Reductions that act inside the LLM (AIM's
pruning, FastV, FitPrune, FiCoCo-L) or inside the vision tower (FiCoCo-V) need aim-llava's own
engine. vLLM places as many tokens as a plan declares (``frame_tokens_after_merging``) and fills
them with what the model returns, so the declaration is checked against what the plan produces,
once per frame size, and again on every video reduced. This module imports no vLLM code."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from aim_llava.errors import one_line
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


@functools.cache
def frame_tokens(plan: ReductionPlan, tokens_per_frame: int) -> int:
    """The tokens a frame of ``tokens_per_frame`` keeps under ``plan``: its declaration, refused
    (naming the plan) unless the plan produces exactly that many."""
    declared = plan.frame_tokens_after_merging(tokens_per_frame)
    produced = plan.reduce_video_frames(torch.zeros(2, tokens_per_frame, 4)).shape[1]
    if produced != declared or declared < 1:
        raise UnsupportedReductionError(
            f"reduction {plan.name!r} leaves {produced} of a frame's {tokens_per_frame} tokens but declares "
            f"{declared}, which aim-llava's vLLM plugin cannot run: vLLM would give the video room for "
            f"{declared} a frame"
        )
    return declared


def reduce_frames(plan: ReductionPlan, frames: torch.Tensor) -> torch.Tensor:
    """One video's pooled frame tokens [F, T, C] reduced by ``plan`` -> [F * K, C], K being the
    count vLLM made room for (:func:`frame_tokens`); any other count is an error naming the plan,
    never a silent cut."""
    expected = frame_tokens(plan, frames.shape[1])
    reduced = plan.reduce_video_frames(frames)
    if reduced.shape[1] != expected:
        raise UnsupportedReductionError(
            f"reduction {plan.name!r} left {reduced.shape[1]} tokens of a {frames.shape[1]}-token frame where "
            f"vLLM's prompt holds {expected}: the reduction's count depends on its input, which the plugin "
            f"cannot run"
        )
    return reduced.flatten(0, 1)


def request_preset_index(name: object, deployment: ReductionPlan, num_layers: int, tokens_per_frame: int) -> int:
    """Which plan a request asks for with ``mm_processor_kwargs``: -1 for none (the deployment's),
    else the index of the shipped preset ``name`` in :func:`supported_presets`. Refused: anything
    but a preset name (a request does not read the server's files), a preset the plugin cannot run,
    and one keeping more tokens a frame than the deployment's, whose memory vLLM profiled."""
    if name is None:
        return -1
    if not isinstance(name, str) or name not in available_presets():
        raise UnsupportedReductionError(
            f"a request's aim_reduction must be a preset name ({', '.join(supported_presets(num_layers))}), "
            f"got {one_line(repr(name))}"
        )
    plan = _cached_plan(json.dumps(name), num_layers)
    wanted, allowed = frame_tokens(plan, tokens_per_frame), frame_tokens(deployment, tokens_per_frame)
    if wanted > allowed:
        raise UnsupportedReductionError(
            f"reduction {name!r} keeps {wanted} tokens a frame, more than this deployment's {deployment.name!r} "
            f"({allowed}), for which vLLM sized its memory: ask for one keeping at most {allowed}, or start vLLM "
            f"with a larger aim_reduction"
        )
    return supported_presets(num_layers).index(name)


def preset_of_index(index: int, deployment: ReductionPlan, num_layers: int) -> ReductionPlan:
    """The plan of :func:`request_preset_index`'s answer."""
    return deployment if index < 0 else _cached_plan(json.dumps(supported_presets(num_layers)[index]), num_layers)


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
