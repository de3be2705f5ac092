"""The registry of reduction methods: name -> (options dataclass, plan factory).

A new method is one file in this folder plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aim_llava.reduction.methods.aim import AimOptions, AimPlan
from aim_llava.reduction.methods.fastv import FastVOptions, FastVPlan
from aim_llava.reduction.methods.ficoco import FiCoCoLPlan, FiCoCoOptions, FiCoCoVLOptions, FiCoCoVLPlan
from aim_llava.reduction.methods.fitprune import FitPruneOptions, FitPrunePlan
from aim_llava.reduction.methods.frame_baselines import FrameBaselineOptions, RandomDropPlan, SpatialPoolPlan
from aim_llava.reduction.plan import ReductionPlan


@dataclass(frozen=True)
class NoOptions:
    """The baseline has no settings."""


@dataclass(frozen=True)
class MethodEntry:
    options: type
    build: Callable[..., ReductionPlan]


METHODS: dict[str, MethodEntry] = {
    "none": MethodEntry(NoOptions, lambda options, num_layers, name: ReductionPlan()),
    "aim": MethodEntry(AimOptions, AimPlan),
    "fastv": MethodEntry(FastVOptions, FastVPlan),
    "fitprune": MethodEntry(FitPruneOptions, FitPrunePlan),
    "ficoco_l": MethodEntry(FiCoCoOptions, FiCoCoLPlan),
    "ficoco_v": MethodEntry(FiCoCoVLOptions, FiCoCoVLPlan),
    "random": MethodEntry(FrameBaselineOptions, RandomDropPlan),
    "pool": MethodEntry(FrameBaselineOptions, SpatialPoolPlan),
}
