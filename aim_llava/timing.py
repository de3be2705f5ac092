"""Stage timings of one call, taken without host-device synchronisation.

Code on the inference path marks its stages with ``with stage("importance", device): ...``; that
is free unless a caller collects them for the current thread/task:

>>> with StageTimes() as times:
...     model.generate(...)
>>> times.seconds()          # {"vision": 0.066, "prefill": 0.058, "importance": 0.002, ...}

On CUDA a stage records two CUDA events on the given device's current stream (no
synchronisation, so the queue of launched work never drains; the device named, not the thread's
current one, whose stream would not order the events with the stage's work); :meth:`StageTimes.seconds` waits for the last event once and sums
the elapsed times. On the CPU it reads the clock. Repeated stages add up.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections import defaultdict

import torch

_ACTIVE: contextvars.ContextVar[StageTimes | None] = contextvars.ContextVar("aim_llava_stage_times", default=None)


class StageTimes:
    """Collects the stages run in its ``with`` block (in this thread or task)."""

    def __init__(self):
        self.cpu: dict[str, float] = defaultdict(float)
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)
        self.order: list[str] = []
        self._token = None

    def __enter__(self) -> StageTimes:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    def _note(self, name: str) -> None:
        if name not in self.order:
            self.order.append(name)

    def seconds(self) -> dict[str, float]:
        """Total seconds per stage, in the order stages first ran (waits for the GPU once)."""
        totals = dict(self.cpu)
        for name, pairs in self.events.items():
            pairs[-1][1].synchronize()
            totals[name] = totals.get(name, 0.0) + sum(start.elapsed_time(end) for start, end in pairs) / 1000.0
        return {name: totals[name] for name in self.order}


@contextlib.contextmanager
def stage(name: str, device: torch.device | str | None = None):
    """Time the block as stage ``name`` of the active :class:`StageTimes` (a no-op without one)."""
    times = _ACTIVE.get()
    if times is None:
        yield
        return
    times._note(name)
    if device is not None and torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(device))
        try:
            yield
        finally:
            end.record(torch.cuda.current_stream(device))
            times.events[name].append((start, end))
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        times.cpu[name] += time.perf_counter() - started
