"""The registry of reduction methods: name -> where its options dataclass and plan class live.

A new method is one file in this folder plus one entry here. A method's module is imported only
when that method is used, so loading a config does not import every method.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodEntry:
    """``module`` (relative to this package) defines ``options`` (a dataclass) and ``plan``
    (called as ``plan(options, num_layers, name)``)."""

    module: str
    options_name: str
    plan_name: str

    def _attribute(self, name: str):
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), name)

    @property
    def options(self) -> type:
        return self._attribute(self.options_name)

    def build(self, options, num_layers: int, name: str):
        return self._attribute(self.plan_name)(options, num_layers, name)


METHODS: dict[str, MethodEntry] = {
    "none": MethodEntry("baseline", "NoOptions", "BaselinePlan"),
    "aim": MethodEntry("aim", "AimOptions", "AimPlan"),
    "fastv": MethodEntry("fastv", "FastVOptions", "FastVPlan"),
    "fitprune": MethodEntry("fitprune", "FitPruneOptions", "FitPrunePlan"),
    "ficoco_l": MethodEntry("ficoco", "FiCoCoOptions", "FiCoCoLPlan"),
    "ficoco_v": MethodEntry("ficoco", "FiCoCoVLOptions", "FiCoCoVLPlan"),
    "random": MethodEntry("frame_baselines", "FrameBaselineOptions", "RandomDropPlan"),
    "pool": MethodEntry("frame_baselines", "FrameBaselineOptions", "SpatialPoolPlan"),
}
