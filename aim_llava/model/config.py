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
from dataclasses import dataclass, field
from typing import Any

from aim_llava.errors import CheckpointError

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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class LlavaConfig:
    """Everything the vendored model needs, independent of the layout it was read from."""

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


def _text_config(cfg: dict, source: str) -> TextConfig:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope type '{rope_type}' is not supported (only 'default')")
    if cfg.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    return TextConfig(
        vocab_size=_require(cfg, "vocab_size", source),
        hidden_size=_require(cfg, "hidden_size", source),
        intermediate_size=_require(cfg, "intermediate_size", source),
        num_hidden_layers=_require(cfg, "num_hidden_layers", source),
        num_attention_heads=_require(cfg, "num_attention_heads", source),
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _vision_config(fields: dict, num_layers: int) -> VisionConfig:
    known = {f.name for f in dataclasses.fields(VisionConfig)}
    kwargs = {k: v for k, v in fields.items() if k in known}
    for key in ("image_mean", "image_std"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    kwargs["num_hidden_layers"] = num_layers
    return VisionConfig(**kwargs)


def _check_supported(values: dict, source: str) -> None:
    for key, allowed in SUPPORTED.items():
        if key in values and values[key] not in allowed:
            raise CheckpointError(
                f"{source}: {key}={values[key]!r} is not supported (supported: {', '.join(allowed)})"
            )
    aspect = values.get("image_aspect_ratio", "anyres_max_9")
    if not (aspect in ("pad", "anyres") or aspect.startswith("anyres_max_")):
        raise CheckpointError(f"{source}: image_aspect_ratio={aspect!r} is not supported")


def config_from_llava_qwen(cfg: dict, source: str = "config.json") -> LlavaConfig:
    """Read the flat LLaVA-NeXT config."""
    tower = cfg.get("mm_vision_tower", "google/siglip-so400m-patch14-384")
    if "mm_vision_config" in cfg:
        # Full tower as trained; like the published towers, the last layer is not used.
        vision_fields = cfg["mm_vision_config"]
        vision = _vision_config(vision_fields, vision_fields["num_hidden_layers"] - 1)
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
    return dataclasses.replace(defaults, **overrides)


def config_from_hf(cfg: dict, source: str = "config.json") -> LlavaConfig:
    """Read the transformers ``llava_onevision`` config."""
    text_cfg = _require(cfg, "text_config", source)
    vision_cfg = dict(_require(cfg, "vision_config", source))
    strategy = cfg.get("vision_feature_select_strategy", "full")
    if strategy != "full":
        raise CheckpointError(f"{source}: vision_feature_select_strategy={strategy!r} is not supported")
    feature_layer = cfg.get("vision_feature_layer", -1)
    if not isinstance(feature_layer, int):
        raise CheckpointError(f"{source}: several vision_feature_layer values are not supported")
    built_layers = vision_cfg.get("num_hidden_layers", 26)
    used_layers = built_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    vision = _vision_config(vision_cfg, used_layers)
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
        # transformers lists (height, width); LLaVA-NeXT, and this package, (width, height).
        result.image_grid_pinpoints = [[w, h] for h, w in cfg["image_grid_pinpoints"]]
    return result


def config_from_dict(cfg: dict, source: str = "config.json") -> LlavaConfig:
    """Dispatch on ``model_type``; unknown types get a clear error."""
    model_type = cfg.get("model_type")
    if model_type in LLAVA_QWEN_MODEL_TYPES:
        return config_from_llava_qwen(cfg, source)
    if model_type in HF_MODEL_TYPES:
        return config_from_hf(cfg, source)
    raise CheckpointError(
        f"{source}: model_type {model_type!r} is not a LLaVA-OneVision checkpoint "
        f"(expected one of {', '.join(LLAVA_QWEN_MODEL_TYPES + HF_MODEL_TYPES)})"
    )
