"""No reduction: every token reaches every layer."""

from __future__ import annotations

from dataclasses import dataclass

from aim_llava.reduction.plan import ReductionPlan


@dataclass(frozen=True)
class NoOptions:
    """The baseline has no settings."""


class BaselinePlan(ReductionPlan):
    def __init__(self, options: NoOptions, num_layers: int, name: str = "baseline"):
        self.name = name
