"""Retention schedules: the fraction of the original visual tokens kept after each LLM layer."""

from __future__ import annotations

from dataclasses import dataclass

from aim_llava.errors import AimLlavaError

# Start layers of the published schedule; other depths start at half the depth.
PUBLISHED_START = {28: 14, 32: 13}
SCHEDULE_KINDS = ("published", "linear", "explicit")


class ScheduleError(AimLlavaError):
    """A schedule that does not fit the model."""


@dataclass(frozen=True)
class RetentionSchedule:
    """``retention[l]``: share of the original visual tokens kept after layer ``l`` (non-increasing).

    A layer prunes when its retention is below the previous layer's; its decision, made from its
    own attention, applies from the next layer on.
    """

    retention: tuple[float, ...]

    def __post_init__(self) -> None:
        previous = 1.0
        for layer, value in enumerate(self.retention):
            if not 0.0 <= value <= 1.0:
                raise ScheduleError(f"retention after layer {layer} is {value}: it must lie in [0, 1]")
            if value > previous + 1e-12:
                raise ScheduleError(f"retention rises after layer {layer} ({previous} -> {value}): tokens cannot return")
            previous = value

    @property
    def prunes(self) -> bool:
        """Whether any layer removes tokens."""
        return any(value < 1.0 for value in self.retention)

    @property
    def num_layers(self) -> int:
        return len(self.retention)

    def prunes_after(self, layer: int) -> bool:
        before = 1.0 if layer == 0 else self.retention[layer - 1]
        return self.retention[layer] < before

    def kept(self, layer: int, num_visual: int) -> int:
        """Visual tokens kept after ``layer`` out of ``num_visual`` original ones."""
        return int(num_visual * self.retention[layer])

    @classmethod
    def none(cls, num_layers: int) -> RetentionSchedule:
        return cls((1.0,) * num_layers)

    @classmethod
    def published(cls, num_layers: int, start: int | None = None, step: float = 0.125) -> RetentionSchedule:
        """Keep all before ``start``; after layer l >= start keep 1 - (l - start + 1) * step."""
        start = default_start(num_layers) if start is None else start
        check_layer(start, num_layers, "prune_start")
        return cls(tuple(1.0 if l < start else max(0.0, 1.0 - (l - start + 1) * step) for l in range(num_layers)))

    @classmethod
    def linear(cls, num_layers: int, l1: int, l2: int, floor: float = 0.0) -> RetentionSchedule:
        """Keep all for layers < l1, then fall linearly to ``floor`` after layer l2, and stay there."""
        check_layer(l1, num_layers, "prune_start")
        if l2 < l1:
            raise ScheduleError(f"prune_end ({l2}) must not come before prune_start ({l1})")
        span = l2 - l1 + 1
        values = []
        for l in range(num_layers):
            if l < l1:
                values.append(1.0)
            else:
                values.append(max(floor, 1.0 - (1.0 - floor) * min(l - l1 + 1, span) / span))
        return cls(tuple(values))

    @classmethod
    def explicit(cls, values: list[float], num_layers: int) -> RetentionSchedule:
        if len(values) != num_layers:
            raise ScheduleError(f"prune_retention has {len(values)} values but the model has {num_layers} layers")
        return cls(tuple(float(v) for v in values))


def default_start(num_layers: int) -> int:
    return PUBLISHED_START.get(num_layers, num_layers // 2)


def check_layer(layer: int, num_layers: int, name: str) -> None:
    if not 0 <= layer < num_layers:
        raise ScheduleError(f"{name}={layer} is beyond the model's {num_layers} layers (use 0..{num_layers - 1})")
