"""Stand-ins for the ``torch.cuda`` calls of the decoding loop and the stage timer, so that their
own code (streams, events, graph capture and replay) runs in CPU tests, and the devices they are
asked for can be checked.

:class:`RecordingGraph` is a CUDA graph on the CPU: its capture records the operators the step
dispatches, with their tensors (refusing those that would synchronise with the host, as a capture
does), and then fills the results with NaN, since a real capture computes nothing and leaves the
memory holding garbage until the first replay; a replay runs the recorded operators again on the
same tensors, writing each result into the tensor recorded for it (host values baked in, inputs
read from the static tensors, as on a GPU). :class:`EmptyGraph` records nothing, as a capture on
a stream of another GPU does.
"""

from __future__ import annotations

import contextlib

import torch
from sync_points import refuse_sync_points
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class FakeStream:
    def __init__(self, device=None, log=None):
        self.device = None if device is None else torch.device(device)
        if log is not None:
            log.append(self.device)

    def wait_stream(self, other) -> None:
        pass


class FakeMemPool:
    """``torch.cuda.MemPool``: an id, and the device that was current when it was made."""

    def __init__(self, device):
        self.device = device
        self.id = (0, id(self))


class FakeEvent:
    def __init__(self, recorded: list, waits: list, enable_timing: bool = False):
        self.recorded, self.waits = recorded, waits
        self.stream_device = None

    def record(self, stream=None) -> None:
        self.stream_device = None if stream is None else stream.device
        self.recorded.append(self.stream_device)

    def synchronize(self) -> None:
        self.waits.append(self)

    def elapsed_time(self, end) -> float:
        return 2.0  # milliseconds


def aliases(func) -> bool:
    """Whether an operator's results are views of (or are) its inputs."""
    return any(ret.alias_info is not None for ret in func._schema.returns)


class _Recorder(TorchDispatchMode):
    def __init__(self, operations: list):
        super().__init__()
        self.operations = operations

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self.operations.append((func, args, kwargs, result))
        return result


class RecordingGraph:
    """``torch.cuda.CUDAGraph`` on the CPU (see the module docstring)."""

    def __init__(self, stream_log: list | None = None):
        self.operations: list = []
        self.replays = 0
        self.pool = None
        self.stream = None
        self.was_reset = False
        self._stack = contextlib.ExitStack()
        self._streams = stream_log if stream_log is not None else []

    def capture_begin(self, pool=None, capture_error_mode: str | None = None) -> None:
        self.pool = pool
        self.stream = self._streams[-1] if self._streams else None  # the stream the capture records on
        self._stack.enter_context(refuse_sync_points())
        self._stack.enter_context(_Recorder(self.operations))

    def reset(self) -> None:
        self.operations, self.was_reset = [], True

    def capture_end(self) -> None:
        self._stack.close()
        for func, _, _, result in self.operations:
            if not aliases(func):
                for tensor in tree_leaves(result):
                    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                        tensor.fill_(float("nan"))

    def replay(self) -> None:
        self.replays += 1
        for func, args, kwargs, recorded in self.operations:
            result = func(*args, **kwargs)
            if not aliases(func):
                for old, new in zip(tree_leaves(recorded), tree_leaves(result)):
                    if isinstance(old, torch.Tensor):
                        old.copy_(new)


class EmptyGraph(RecordingGraph):
    """A capture that recorded nothing: the step ran eagerly during it, replays do nothing."""

    def capture_begin(self, pool=None, capture_error_mode: str | None = None) -> None:
        self.pool = pool

    def capture_end(self) -> None:
        pass

    def replay(self) -> None:
        self.replays += 1


class FakeCuda:
    """Installs the stand-ins (undone with ``monkeypatch``) and records what they are asked for:
    the devices of created streams, of the streams asked for as current, of recorded events, the
    events waited for, the graphs and memory pools made, the devices made current
    (``torch.cuda.device``), the streams made current (``torch.cuda.stream``: the innermost is
    the one a graph captures on), and the bytes pinned."""

    def __init__(self, monkeypatch, graph: type = RecordingGraph):
        self.streams: list = []
        self.current_streams: list = []
        self.events: list = []
        self.waits: list[FakeEvent] = []
        self.graphs: list = []
        self.pools: list[FakeMemPool] = []
        self.devices_entered: list = []
        self.entered_streams: list[FakeStream] = []
        self.pinned_bytes: list[int] = []
        current_device = []

        def make_graph():
            self.graphs.append(graph(self.entered_streams))
            return self.graphs[-1]

        def make_pool(*args, **kwargs):
            self.pools.append(FakeMemPool(current_device[-1] if current_device else None))
            return self.pools[-1]

        @contextlib.contextmanager
        def device(where):
            self.devices_entered.append(torch.device(where))
            current_device.append(torch.device(where))
            try:
                yield
            finally:
                current_device.pop()

        @contextlib.contextmanager
        def stream(chosen):
            self.entered_streams.append(chosen)
            try:
                yield
            finally:
                self.entered_streams.pop()

        def pin(tensor, *args, **kwargs):
            self.pinned_bytes.append(tensor.nbytes)
            return tensor

        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, **_: FakeStream(device, self.streams))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device, self.current_streams))
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing=False, **_: FakeEvent(self.events, self.waits, enable_timing))
        monkeypatch.setattr(torch.cuda, "CUDAGraph", make_graph)
        monkeypatch.setattr(torch.cuda, "MemPool", make_pool)
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin)


class ToyStep:
    """A decoding step in miniature: writes its input at slot ``index`` of a buffer (the KV cache)
    and returns a function of the whole buffer; ``host_read`` names a call a capture refuses."""

    def __init__(self, host_read=None):
        self.buffer = torch.zeros(6, 3)
        self.weights = torch.arange(18.0).view(6, 3) / 10
        self.host_read = host_read

    def __call__(self, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.buffer.index_copy_(0, index, values[None])
        if self.host_read is not None:
            self.host_read(self.buffer)
        return (self.buffer * self.weights).sum(dim=0)

    def expected(self, steps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs of the steps run eagerly on a fresh buffer."""
        fresh = ToyStep()
        return [fresh(values, torch.tensor([number])) for number, values in enumerate(steps)]
