"""The model families the package runs, keyed by the ``model_type`` of a checkpoint's config.json.

A family is everything that differs between vision LLMs built on our Qwen2 decoder: how a config
is read, which modules the model has and what its checkpoint names are, how frames are sampled
and preprocessed, how they become groups of visual tokens, how the prompt is built, which
positions the tokens take, and the shapes its FLOPs are counted with. What families share (the
decoder layers, the KV cache, the generation loop, the reduction hooks and the token state) is
written once, in :mod:`aim_llava.model.language_model` and :mod:`aim_llava.reduction`.

Every family object (a :class:`ModelFamily`) lives in its own module, imported only when a
checkpoint of it is used. Adding a family is a folder (or module) with its model and one
:class:`FamilyEntry` in :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aim_llava.errors import CheckpointError
from aim_llava.text_files import parse_json


@dataclass(frozen=True)
class LoadingRules:
    """A family's checkpoint names: ``rename`` maps a tensor name in the file to the model's,
    ``tolerated`` says which other tensors may be in the file and are not loaded (parts the model
    never runs, buffers it recomputes); ``optional`` model tensors may be absent (a tied head)."""

    rename: Any
    tolerated: Any
    optional: frozenset[str] = frozenset()


class ModelFamily:
    """What a family provides. Its model (built by :meth:`build_model`) takes the calls of
    :class:`aim_llava.model.language_model.llava_qwen.Qwen2MultimodalForCausalLM` (``forward``,
    ``generate``, ``prefill``), and encodes visuals in groups with ``encode_images`` (tower and
    projector or merger), ``video_features`` (the reduction's merging per group) and
    ``visual_features``; its ``prepare_multimodal_inputs`` gives the tokens their positions."""

    name: str = ""
    title: str = ""
    model_types: tuple[str, ...] = ()
    layouts: tuple[str, ...] = ()
    bench_frame_size: tuple[int, int] = (360, 640)  # (height, width) of the bench's synthetic frames
    native_resolution: bool = False  # frames keep their aspect ratio (else the processor squares them)

    def read_config(self, raw: dict, source: str):
        """The family's config object from a parsed config.json."""
        raise NotImplementedError

    def build_model(self, config, attn_implementation: str):
        """The model's modules (under whatever device context the caller set: meta when loading)."""
        raise NotImplementedError

    def loading_rules(self, config) -> LoadingRules:
        raise NotImplementedError

    def image_processor(self, config, model_dir: Path | None = None):
        """The processor that turns frames and images into the model's pixel input."""
        raise NotImplementedError

    def default_sampling(self, processor) -> dict:
        """How frames are sampled when the caller says nothing (``SamplingOptions`` fields)."""
        return {}

    def sampling(self, options: dict) -> dict:
        """The caller's sampling fields (``num_frames``, ``fps``...) with the family's frame rule."""
        return options

    def check_template(self, name: str) -> None:
        """Refuse a conversation template the family's prompts cannot use."""

    def preprocessing_key(self, processor, config) -> tuple:
        """What of the processor and the config decides how frames become visual tokens (part of
        the reuse cache's keys; read at each look-up, so a setting changed in place is a miss)."""
        raise NotImplementedError

    def preprocess(self, clip, processor, model) -> tuple[Any, Any, str]:
        """(pixel input, image size or None, modality) of one read clip, on the model's device."""
        raise NotImplementedError

    def prompt(self, turns: list[tuple[str, str | None]], modality: str, system: str | None, template: str,
               tokenizer, processor=None) -> str:
        """The chat prompt of ``turns`` [(question, answer or None)] with the visual's place marked
        ``<image>`` in the first turn (``tokenizer_image_token`` turns it into the placeholder id)."""
        raise NotImplementedError

    def check_reduction(self, plan) -> None:
        """Refuse, in one line, a reduction that cannot apply to this family."""

    def frame_limit(self, config, plan) -> int:
        """The most frames whose visual tokens (after the plan's merging) can fit the context."""
        raise NotImplementedError

    def video_token_counts(self, config, plan, frames: int, text_tokens: int) -> tuple[int, list[int], list[int]]:
        """(visual tokens, tokens entering each LLM layer, tokens leaving it) of a video prompt."""
        raise NotImplementedError

    def vision_flops(self, config, plan, frames: int) -> float:
        """The vision tower's FLOPs over a video of ``frames`` frames."""
        raise NotImplementedError

    def projector_flops(self, config, frames: int) -> float:
        """The projector's (or patch merger's) FLOPs over a video of ``frames`` frames."""
        raise NotImplementedError


@dataclass(frozen=True)
class FamilyEntry:
    """``module`` defines ``FAMILY``, the family object; it is imported when first asked for."""

    title: str
    model_types: tuple[str, ...]
    module: str

    def load(self) -> ModelFamily:
        return importlib.import_module(self.module).FAMILY


FAMILIES: dict[str, FamilyEntry] = {
    "llava_onevision": FamilyEntry("LLaVA-OneVision / LLaVA-Video", ("llava", "llava_qwen", "llava_onevision"),
                                   "aim_llava.model.llava_onevision_family"),
    "qwen2_5_vl": FamilyEntry("Qwen2.5-VL", ("qwen2_5_vl",), "aim_llava.model.qwen2_5_vl.family"),
}


def families_line() -> str:
    """The families and their model types, for messages."""
    return "; ".join(f"{entry.title} (model_type {', '.join(entry.model_types)})" for entry in FAMILIES.values())


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name].load()


def family_for_model_type(model_type, source: str = "config.json") -> ModelFamily:
    """The family of a checkpoint whose config.json says ``model_type``."""
    for entry in FAMILIES.values():
        if model_type in entry.model_types:
            return entry.load()
    raise CheckpointError(f"{source}: model_type {model_type!r} is not a model family aim-llava runs; "
                          f"it runs {families_line()}")


def family_of(config) -> ModelFamily:
    """The family of a config object (each family's config class names its family)."""
    return family_named(config.family)


def config_from_raw(raw, source: str = "config.json"):
    """The config object of a parsed config.json, read by its family."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: the whole file must be a JSON object, got {type(raw).__name__}")
    return family_for_model_type(raw.get("model_type"), source).read_config(raw, source)


def read_config_file(path: str | Path):
    """The config object of a checkpoint's config.json (any family, any layout it reads)."""
    try:
        raw = parse_json(Path(path).read_text(encoding="utf-8"))
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    return config_from_raw(raw, str(path))
