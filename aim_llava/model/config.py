"""Plain configuration objects for LLaVA-OneVision, read from either checkpoint layout.

Two layouts exist on disk:

* ``llava_qwen``: the original LLaVA-NeXT checkpoints (``"model_type": "llava"`` or
  ``"llava_qwen"``), one flat ``config.json`` with the Qwen2 fields plus ``mm_*`` fields. The
  vision tower appears only by name, so its shape comes from :data:`KNOWN_VISION_TOWERS` (or from
  an ``mm_vision_config`` entry, which the tiny test checkpoints use).
* ``hf``: the transformers conversion (``"model_type": "llava_onevision"``) with nested
  ``text_config`` and ``vision_config``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from aim_llava.errors import CheckpointError
from aim_llava.text_files import parse_json

LLAVA_QWEN_MODEL_TYPES = ("llava", "llava_qwen")
HF_MODEL_TYPES = ("llava_onevision",)


@dataclass
class VisionConfig:
    """SigLIP vision tower. ``num_hidden_layers`` counts the layers actually run."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 384
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def grid_size(self) -> int:
        """Patches per side (27 for so400m-patch14-384)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


# so400m has 27 encoder layers; the LLaVA checkpoints drop the last one (select layer -2).
KNOWN_VISION_TOWERS: dict[str, VisionConfig] = {
    "google/siglip-so400m-patch14-384": VisionConfig(),
}


@dataclass
class TextConfig:
    """Qwen2 decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    mrope_section: tuple[int, ...] | None = None  # multimodal RoPE: rotary pairs per (t, h, w) axis

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class LlavaConfig:
    """Everything the vendored model needs, independent of the layout it was read from."""

    family: ClassVar[str] = "llava_onevision"  # its entry in aim_llava.model.families
    text: TextConfig
    vision: VisionConfig
    layout: str = "llava_qwen"
    mm_vision_tower: str = "google/siglip-so400m-patch14-384"
    mm_projector_type: str = "mlp2x_gelu"
    mm_patch_merge_type: str = "spatial_unpad"
    image_aspect_ratio: str = "anyres_max_9"
    image_grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [[a * 384, b * 384] for a in range(1, 7) for b in range(1, 7)]
    )
    mm_spatial_pool_mode: str = "bilinear"
    mm_spatial_pool_stride: int = 2
    mm_newline_position: str = "one_token"
    image_token_index: int = 151646
    tokenizer_model_max_length: int | None = 32768
    tokenizer_padding_side: str = "right"
    torch_dtype: str | None = None

    @property
    def max_length(self) -> int:
        return self.tokenizer_model_max_length or self.text.max_position_embeddings


SUPPORTED = {
    "mm_projector_type": ("mlp2x_gelu",),
    "mm_patch_merge_type": ("spatial_unpad",),
    "mm_spatial_pool_mode": ("bilinear",),
    "mm_newline_position": ("one_token",),
}


def _require(cfg: dict, key: str, source: str) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{source} has no '{key}': the checkpoint's config is incomplete")
    return cfg[key]


def _mapping(value, key: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _positive_int(cfg: dict, key: str, source: str, default: int | None = None) -> int:
    value = cfg.get(key, default) if default is not None else _require(cfg, key, source)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{source}: '{key}' must be a positive whole number, got {value!r}")
    return value


def _positive_float(cfg: dict, key: str, source: str, default: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CheckpointError(f"{source}: '{key}' must be a positive number, got {value!r}")
    return float(value)


def _text_config(cfg: dict, source: str) -> TextConfig:
    rope = _mapping(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}, "rope_parameters", source)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope type '{rope_type}' is not supported (only 'default')")
    if cfg.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    heads = _positive_int(cfg, "num_attention_heads", source)
    text = TextConfig(
        vocab_size=_positive_int(cfg, "vocab_size", source),
        hidden_size=_positive_int(cfg, "hidden_size", source),
        intermediate_size=_positive_int(cfg, "intermediate_size", source),
        num_hidden_layers=_positive_int(cfg, "num_hidden_layers", source),
        num_attention_heads=heads,
        num_key_value_heads=_positive_int(cfg, "num_key_value_heads", source, heads),
        rms_norm_eps=_positive_float(cfg, "rms_norm_eps", source, 1e-6),
        rope_theta=_positive_float(rope, "rope_theta", source, _positive_float(cfg, "rope_theta", source, 1e6)),
        max_position_embeddings=_positive_int(cfg, "max_position_embeddings", source, 32768),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    if text.hidden_size % heads or heads % text.num_key_value_heads:
        raise CheckpointError(f"{source}: hidden_size {text.hidden_size}, {heads} attention heads and "
                              f"{text.num_key_value_heads} key/value heads do not divide evenly")
    return text


def _vision_config(fields: dict, num_layers: int, source: str) -> VisionConfig:
    known = {f.name for f in dataclasses.fields(VisionConfig)}
    kwargs = {k: v for k, v in fields.items() if k in known}
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "patch_size", "image_size",
                "num_channels"):
        if key in kwargs:
            _positive_int(kwargs, key, source)
    for key in ("image_mean", "image_std"):
        if key in kwargs:
            values = kwargs[key]
            if not isinstance(values, list) or len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
                raise CheckpointError(f"{source}: '{key}' must be a list of three numbers")
            kwargs[key] = tuple(values)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise CheckpointError(f"{source}: the vision tower must keep at least one layer")
    kwargs["num_hidden_layers"] = num_layers
    return VisionConfig(**kwargs)


def _check_supported(values: dict, source: str) -> None:
    for key, allowed in SUPPORTED.items():
        if key in values and values[key] not in allowed:
            raise CheckpointError(
                f"{source}: {key}={values[key]!r} is not supported (supported: {', '.join(allowed)})"
            )
    aspect = values.get("image_aspect_ratio", "anyres_max_9")
    if not isinstance(aspect, str) or not (aspect in ("pad", "anyres") or re.fullmatch(r"anyres_max_\d+", aspect)):
        raise CheckpointError(f"{source}: image_aspect_ratio={aspect!r} is not supported")


def config_from_llava_qwen(cfg: dict, source: str = "config.json") -> LlavaConfig:
    """Read the flat LLaVA-NeXT config."""
    tower = cfg.get("mm_vision_tower", "google/siglip-so400m-patch14-384")
    if "mm_vision_config" in cfg:
        # Full tower as trained; like the published towers, the last layer is not used.
        vision_fields = _mapping(cfg["mm_vision_config"], "mm_vision_config", source)
        vision = _vision_config(vision_fields, _positive_int(vision_fields, "num_hidden_layers", source) - 1, source)
    elif tower in KNOWN_VISION_TOWERS:
        vision = dataclasses.replace(KNOWN_VISION_TOWERS[tower])
    else:
        raise CheckpointError(
            f"{source}: unknown vision tower {tower!r}; known: {', '.join(KNOWN_VISION_TOWERS)} "
            "(or describe it in an 'mm_vision_config' entry)"
        )
    if "mm_hidden_size" in cfg and cfg["mm_hidden_size"] != vision.hidden_size:
        raise CheckpointError(
            f"{source}: mm_hidden_size={cfg['mm_hidden_size']} but the vision tower {tower!r} "
            f"has hidden size {vision.hidden_size}"
        )
    _check_supported(cfg, source)
    defaults = LlavaConfig(text=_text_config(cfg, source), vision=vision, layout="llava_qwen")
    overrides = {
        k: cfg[k]
        for k in (
            "mm_vision_tower",
            "mm_projector_type",
            "mm_patch_merge_type",
            "image_aspect_ratio",
            "image_grid_pinpoints",
            "mm_spatial_pool_mode",
            "mm_spatial_pool_stride",
            "mm_newline_position",
            "image_token_index",
            "tokenizer_model_max_length",
            "tokenizer_padding_side",
            "torch_dtype",
        )
        if cfg.get(k) is not None
    }
    for key in ("mm_spatial_pool_stride", "tokenizer_model_max_length"):
        if key in overrides:
            _positive_int(overrides, key, source)
    if "image_token_index" in overrides and not isinstance(overrides["image_token_index"], int):
        raise CheckpointError(f"{source}: 'image_token_index' must be a whole number")
    if "image_grid_pinpoints" in overrides:
        _check_pinpoints(overrides["image_grid_pinpoints"], source)
    return dataclasses.replace(defaults, **overrides)


def _check_pinpoints(pinpoints, source: str) -> None:
    if not isinstance(pinpoints, list) or not pinpoints or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in p)
        for p in pinpoints
    ):
        raise CheckpointError(f"{source}: 'image_grid_pinpoints' must be a list of [width, height] pairs of sizes")


def config_from_hf(cfg: dict, source: str = "config.json") -> LlavaConfig:
    """Read the transformers ``llava_onevision`` config."""
    text_cfg = _mapping(_require(cfg, "text_config", source), "text_config", source)
    vision_cfg = dict(_mapping(_require(cfg, "vision_config", source), "vision_config", source))
    strategy = cfg.get("vision_feature_select_strategy", "full")
    if strategy != "full":
        raise CheckpointError(f"{source}: vision_feature_select_strategy={strategy!r} is not supported")
    feature_layer = cfg.get("vision_feature_layer", -1)
    if not isinstance(feature_layer, int):
        raise CheckpointError(f"{source}: several vision_feature_layer values are not supported")
    built_layers = _positive_int(vision_cfg, "num_hidden_layers", source, 26)
    used_layers = built_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    vision = _vision_config(vision_cfg, used_layers, source)
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: projector_hidden_act must be 'gelu'")
    aspect = cfg.get("vision_aspect_ratio", "anyres_max_9")
    _check_supported({"image_aspect_ratio": aspect}, source)
    text = _text_config(text_cfg, source)
    if "tie_word_embeddings" in cfg:
        text.tie_word_embeddings = bool(cfg["tie_word_embeddings"] or text.tie_word_embeddings)
    result = LlavaConfig(
        text=text,
        vision=vision,
        layout="hf",
        image_aspect_ratio=aspect,
        image_token_index=cfg.get("image_token_index", cfg.get("image_token_id", 151646)),
        tokenizer_model_max_length=text.max_position_embeddings,
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype") or text_cfg.get("torch_dtype"),
    )
    if cfg.get("image_grid_pinpoints"):
        _check_pinpoints(cfg["image_grid_pinpoints"], source)
        # transformers lists (height, width); LLaVA-NeXT, and this package, (width, height).
        result.image_grid_pinpoints = [[w, h] for h, w in cfg["image_grid_pinpoints"]]
    return result


def config_from_dict(cfg: dict, source: str = "config.json") -> LlavaConfig:
    """Dispatch on ``model_type``; unknown types and ill-typed fields get a clear error."""
    _mapping(cfg, "the whole file", source)
    model_type = cfg.get("model_type")
    if model_type in LLAVA_QWEN_MODEL_TYPES:
        return config_from_llava_qwen(cfg, source)
    if model_type in HF_MODEL_TYPES:
        return config_from_hf(cfg, source)
    raise CheckpointError(
        f"{source}: model_type {model_type!r} is not a LLaVA-OneVision checkpoint "
        f"(expected one of {', '.join(LLAVA_QWEN_MODEL_TYPES + HF_MODEL_TYPES)})"
    )


def config_from_file(path: Path) -> LlavaConfig:
    """Read a checkpoint's ``config.json`` (either layout)."""
    try:
        raw = parse_json(Path(path).read_text(encoding="utf-8"))
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    return config_from_dict(raw, str(path))
