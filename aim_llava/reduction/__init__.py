"""Visual-token reduction: configuration and methods (no model code)."""

from aim_llava.reduction.config import ReductionConfig, available_presets, load_reduction_config

__all__ = ["ReductionConfig", "available_presets", "load_reduction_config"]
