"""The reduction configuration object and the YAML presets (``configs/`` in the repository,
installed as the package ``aim_llava.configs``).

A config is a method name plus that method's options dataclass (see ``reduction/methods``). In
YAML, ``name`` and ``method`` sit beside the method's options. ``config.build(num_layers)`` gives
the :class:`~aim_llava.reduction.plan.ReductionPlan` that a model call takes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aim_llava.errors import AimLlavaError
from aim_llava.reduction.methods import METHODS
from aim_llava.reduction.plan import ReductionPlan

SOURCE_PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(AimLlavaError):
    """A reduction preset or config file that cannot be used."""


@dataclass(frozen=True)
class ReductionConfig:
    """Which visual-token reduction runs (``method``), with its options."""

    name: str = "baseline"
    method: str = "none"
    options: Any = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown reduction method {self.method!r}; known: {', '.join(METHODS)}")
        if self.options is None:
            object.__setattr__(self, "options", METHODS[self.method].options())
        elif not isinstance(self.options, METHODS[self.method].options):
            raise ConfigError(f"options for method {self.method!r} must be {METHODS[self.method].options.__name__}")

    def digest(self) -> str:
        """sha256 of what the config does: its method, its options and the content of the files
        they name (a FitPrune recipe); not its name. Two configs with one digest reduce alike."""
        files = getattr(self.options, "content_files", tuple)()
        content = {"method": self.method, "options": dataclasses.asdict(self.options),
                   "files": [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in files]}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()

    def build(self, num_layers: int) -> ReductionPlan:
        """The :class:`ReductionPlan` for an LLM of ``num_layers`` layers (checks the fit)."""
        try:
            return METHODS[self.method].build(self.options, num_layers, self.name)
        except AimLlavaError as err:
            raise ConfigError(f"config {self.name!r}: {err}") from None


def _make_options(method: str, values: dict, source: str):
    if method not in METHODS:
        raise ConfigError(f"{source}: unknown reduction method {method!r}; known: {', '.join(METHODS)}")
    options_class = METHODS[method].options
    known = {f.name for f in dataclasses.fields(options_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        listing = ", ".join(sorted(known | {"name", "method"}))
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} for method {method!r}; known keys: {listing}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return options_class(**values)
    except AimLlavaError as err:
        raise ConfigError(f"{source}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None


def preset_files() -> dict[str, Any]:
    """Preset name -> readable resource: the installed ``aim_llava.configs`` package, or the
    repository's ``configs/`` when the package runs from a source checkout on ``PYTHONPATH``."""
    try:
        root = importlib.resources.files("aim_llava.configs")
    except ModuleNotFoundError:
        root = SOURCE_PRESET_DIR
    return {entry.name[: -len(".yaml")]: entry for entry in root.iterdir() if entry.name.endswith(".yaml")}


def available_presets() -> list[str]:
    return sorted(preset_files())


def build_plan(spec: str | Path | dict | ReductionConfig | None, num_layers: int) -> ReductionPlan:
    """The plan of a preset name, YAML path, mapping or config, for an LLM of ``num_layers``."""
    return load_reduction_config(spec).build(num_layers)


def config_from_mapping(values: dict, source: str) -> ReductionConfig:
    values = dict(values)
    name = str(values.pop("name", Path(source).stem))
    method = values.pop("method", "none")
    return ReductionConfig(name, method, _make_options(method, values, source))


def load_reduction_config(spec: str | Path | dict | ReductionConfig | None) -> ReductionConfig:
    """A preset name (``aim_default``), a YAML file path, ``fitprune:RECIPE.json``, a mapping, a
    config object, or None (no reduction)."""
    if spec is None:
        spec = "baseline"
    if isinstance(spec, ReductionConfig):
        return spec
    if isinstance(spec, dict):
        return config_from_mapping(spec, "reduction config")
    spec = str(spec)
    if spec.startswith("budget:"):
        raise ConfigError(
            f"{spec!r} is solved for a model and a frame count: use it from the aim-llava commands or "
            "VideoLLM.from_pretrained, or call aim_llava.reduction.budget.resolve_reduction"
        )
    if spec.startswith("fitprune:"):
        return config_from_mapping({"name": spec, "method": "fitprune", "recipe": spec.split(":", 1)[1]}, spec)
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {spec}")
        source, name = path, path.stem
    else:
        presets = preset_files()
        if spec not in presets:
            raise ConfigError(f"unknown preset {spec!r}; available: {', '.join(sorted(presets))} (or a .yaml path)")
        source, name = presets[spec], spec
    try:
        values = yaml.safe_load(source.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{spec} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{spec} must hold a mapping of settings")
    values.setdefault("name", name)
    return config_from_mapping(values, str(spec))
