"""The reduction configuration object and the YAML presets in ``aim_llava/configs``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from aim_llava.errors import AimLlavaError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
METHODS = ("none",)


class ConfigError(AimLlavaError):
    """A reduction preset or config file that cannot be used."""


@dataclass(frozen=True)
class ReductionConfig:
    """Which visual-token reduction runs, and its settings."""

    name: str = "baseline"
    method: str = "none"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown reduction method {self.method!r}; known: {', '.join(METHODS)}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def config_from_mapping(values: dict, source: str) -> ReductionConfig:
    known = {f.name for f in dataclasses.fields(ReductionConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    return ReductionConfig(**values)


def load_reduction_config(spec: str | Path | ReductionConfig | None) -> ReductionConfig:
    """A preset name (``baseline``), a YAML file path, a config object, or None (baseline)."""
    if spec is None:
        spec = "baseline"
    if isinstance(spec, ReductionConfig):
        return spec
    spec = str(spec)
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {spec}")
    else:
        path = PRESET_DIR / f"{spec}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {spec!r}; available: {', '.join(available_presets())} (or a .yaml path)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    values.setdefault("name", path.stem)
    return config_from_mapping(values, str(path))
