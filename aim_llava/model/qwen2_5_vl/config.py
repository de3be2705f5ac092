"""Qwen2.5-VL's configuration, read from either layout of its config.json.

* published (``Qwen/Qwen2.5-VL-*-Instruct``, written by transformers 4): the Qwen2 fields at the
  top level, ``rope_scaling: {"type": "mrope", "mrope_section": [16, 24, 24]}``, and a nested
  ``vision_config`` (``in_chans``);
* transformers 5: the text fields in ``text_config`` with ``rope_parameters`` holding the
  ``mrope_section``, and ``vision_config`` (``in_channels``, ``rope_parameters.rope_theta``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from aim_llava.errors import CheckpointError
from aim_llava.model.config import TextConfig, _mapping, _positive_int, _text_config

DEFAULT_MROPE_SECTION = (16, 24, 24)  # transformers' default when a config names none


@dataclass
class Qwen2_5_VLVisionConfig:
    """The vision transformer: ``depth`` blocks, window attention except in
    ``fullatt_block_indexes``, patches of ``patch_size`` pixels over ``temporal_patch_size`` frames,
    merged ``spatial_merge_size`` x ``spatial_merge_size`` into one token of ``out_hidden_size``."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_factor(self) -> int:
        """Pixels per side of one merged token (28)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def window_tokens(self) -> int:
        """Merged tokens per side of an attention window (4)."""
        return self.window_size // self.merge_factor


@dataclass
class Qwen2_5_VLConfig:
    """Everything the vendored Qwen2.5-VL needs, whichever layout it was read from."""

    family: ClassVar[str] = "qwen2_5_vl"  # its entry in aim_llava.model.families
    text: TextConfig
    vision: Qwen2_5_VLVisionConfig
    layout: str = "published"  # config.json as published ("published") or as transformers 5 writes it
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    torch_dtype: str | None = None

    @property
    def max_length(self) -> int:
        return self.text.max_position_embeddings


def _rope(fields: dict, source: str) -> dict:
    return _mapping(fields.get("rope_parameters") or fields.get("rope_scaling") or {}, "rope_parameters", source)


def _mrope_section(rope: dict, head_dim: int, source: str) -> tuple[int, ...]:
    section = rope.get("mrope_section", DEFAULT_MROPE_SECTION)
    if (not isinstance(section, (list, tuple)) or len(section) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in section)):
        raise CheckpointError(f"{source}: mrope_section must be three positive whole numbers, got {section!r}")
    if sum(section) != head_dim // 2:
        raise CheckpointError(f"{source}: mrope_section {list(section)} must add up to half the head size {head_dim}")
    return tuple(section)


def text_config(cfg: dict, source: str) -> TextConfig:
    """The Qwen2 decoder's fields, with the multimodal RoPE section (rope type ``mrope`` or
    ``default``)."""
    fields = _mapping(cfg["text_config"], "text_config", source) if "text_config" in cfg else cfg
    rope = dict(_rope(fields, source) or _rope(cfg, source))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise CheckpointError(f"{source}: rope type '{rope_type}' is not supported (only multimodal RoPE)")
    section = rope.pop("mrope_section", None)
    plain = {key: value for key, value in fields.items() if key not in ("rope_parameters", "rope_scaling")}
    plain["rope_parameters"] = {"rope_type": "default", **{k: v for k, v in rope.items() if k == "rope_theta"}}
    text = _text_config(plain, source)
    text.mrope_section = _mrope_section({"mrope_section": section} if section is not None else {}, text.head_dim,
                                        source)
    text.tie_word_embeddings = bool(cfg.get("tie_word_embeddings") or fields.get("tie_word_embeddings"))
    if fields.get("layer_types") and set(fields["layer_types"]) != {"full_attention"}:
        raise CheckpointError(f"{source}: sliding-window decoder layers are not supported")
    return text


def vision_config(cfg: dict, source: str) -> Qwen2_5_VLVisionConfig:
    fields = _mapping(cfg.get("vision_config", {}), "vision_config", source)
    if fields.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: vision hidden_act {fields['hidden_act']!r} is not supported (only 'silu')")
    known = {f.name for f in dataclasses.fields(Qwen2_5_VLVisionConfig)}
    values = {key: value for key, value in fields.items() if key in known}
    if "in_chans" in fields:
        values.setdefault("in_channels", fields["in_chans"])
    if "spatial_patch_size" in fields:
        values.setdefault("patch_size", fields["spatial_patch_size"])
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "in_channels",
                "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size"):
        if key in values:
            _positive_int(values, key, f"{source} (vision_config)")
    theta = _rope(fields, source).get("rope_theta", 10000.0)
    values["rope_theta"] = float(theta)
    tokens_per_second = values.get("tokens_per_second", 2)
    if isinstance(tokens_per_second, bool) or not isinstance(tokens_per_second, (int, float)) or tokens_per_second <= 0:
        raise CheckpointError(f"{source}: vision tokens_per_second must be a positive number")
    blocks = values.get("fullatt_block_indexes", Qwen2_5_VLVisionConfig.fullatt_block_indexes)
    if not isinstance(blocks, (list, tuple)) or not all(isinstance(b, int) for b in blocks):
        raise CheckpointError(f"{source}: vision fullatt_block_indexes must be a list of block numbers")
    values["fullatt_block_indexes"] = tuple(blocks)
    vision = Qwen2_5_VLVisionConfig(**values)
    if vision.hidden_size % vision.num_heads or vision.head_dim % 4:
        raise CheckpointError(f"{source}: the vision hidden size {vision.hidden_size} and {vision.num_heads} heads give "
                              "no head size divisible by 4 (its 2-D rotary embedding needs one)")
    if vision.window_size % vision.merge_factor:
        raise CheckpointError(f"{source}: vision window_size {vision.window_size} is not a multiple of "
                              f"{vision.merge_factor} pixels (patch size x merge size)")
    return vision


def config_from_dict(cfg: dict, source: str = "config.json") -> Qwen2_5_VLConfig:
    """Read a ``qwen2_5_vl`` config.json (published or transformers-5 layout)."""
    text = text_config(cfg, source)
    vision = vision_config(cfg, source)
    if vision.out_hidden_size != text.hidden_size:
        raise CheckpointError(f"{source}: the vision merger gives {vision.out_hidden_size} features but the LLM's hidden "
                              f"size is {text.hidden_size}")
    ids = {}
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if key in cfg:
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"{source}: '{key}' must be a token id, got {value!r}")
            ids[key] = value
    fields = cfg.get("text_config", cfg)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or (fields.get("dtype") if isinstance(fields, dict) else None)
    layout = "transformers" if "text_config" in cfg else "published"
    return Qwen2_5_VLConfig(text=text, vision=vision, layout=layout, torch_dtype=dtype, **ids)
