"""Counting (or refusing) the host-device synchronisation points of a block of code, on any device.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` reports every synchronising call; on the
CPU nothing synchronises, so the calls that would are counted where Python reaches them: reading
a tensor's values into Python (``item``, ``tolist``, ``bool``/``int``/``float``, ``numpy``,
``cpu``, ``to("cpu")`` (on the CPU: spelled so), ``torch.equal``/``allclose``), data-dependent shapes (``nonzero``,
one-argument ``torch.where``, boolean-mask indexing, ``masked_select``, ``unique``,
``repeat_interleave`` with tensor counts), and copies into pageable host memory (``copy_`` into
a CPU tensor that is not pinned: from the device such a copy waits for it). On the CPU no tensor
can be pinned, so there a ``copy_`` counts unless it says ``non_blocking=True`` (the copies that
go to pinned memory on a GPU say so; a forgotten pin with ``non_blocking=True`` is left to the
GPU tier).

:func:`refuse_sync_points` makes the same calls raise, and also the operators they dispatch to
(which catches them inside torch's own functions too): what a CUDA-graph capture refuses.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import NamedTuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Tensor.__getitem__ is watched by a torch-function mode instead (GetitemWatch): replacing it on the
# class, even for a while, gives every tensor a sequence slot for the rest of the process
TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero",
                  "masked_select", "unique", "__setitem__", "repeat_interleave", "copy_", "to", "equal", "allclose")
TORCH_FUNCTIONS = ("nonzero", "masked_select", "unique", "repeat_interleave", "argwhere", "where", "equal", "allclose")

aten = torch.ops.aten
# operators that need a value on the host (the first) or whose output size depends on values
SYNC_OPERATORS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                  aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default, aten.equal.default,
                  aten.allclose.default}


class SyncPoint(NamedTuple):
    call: str
    where: str
    tensor: int | None  # id() of the tensor the call was made on


class SyncPointRefused(RuntimeError):
    """A call that would synchronise with the host, inside :func:`refuse_sync_points`."""


def _is_bool_index(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _blocking_host_copy(destination: torch.Tensor, source, non_blocking: bool) -> bool:
    if destination.device.type != "cpu":
        return False
    if torch.cuda.is_available():  # the real rule: from the GPU into pageable memory
        return isinstance(source, torch.Tensor) and source.is_cuda and not destination.is_pinned()
    return not non_blocking


def _to_host(args, kwargs) -> bool:
    """``tensor.to(...)`` to the host, blocking: from another device, or (on the CPU, where a
    ``device`` variable may well be the CPU) spelled ``"cpu"``."""
    target = kwargs.get("device")
    for arg in args[1:]:
        if isinstance(arg, (str, torch.device)):
            target = arg
        elif isinstance(arg, torch.Tensor):
            target = arg.device
    non_blocking = kwargs.get("non_blocking") or any(arg is True for arg in args[1:])
    if target is None or non_blocking or torch.device(target).type != "cpu":
        return False
    return args[0].device.type != "cpu" or target == "cpu"


def _synchronises(name: str, args, kwargs) -> bool:
    """Whether ``name`` called with ``args`` (the tensor first, or None for a torch function)."""
    if name in ("__getitem__", "__setitem__"):
        return _is_bool_index(args[1])
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1
    if name == "where":
        return len(args) == 2 and not kwargs  # torch.where(condition): nonzero
    if name == "copy_":
        non_blocking = kwargs.get("non_blocking", len(args) > 2 and args[2])
        return _blocking_host_copy(args[0], args[1], bool(non_blocking))
    if name == "to":
        return _to_host(args, kwargs)
    return True


def _refused_operator(func, args) -> bool:
    if func in SYNC_OPERATORS:
        return True
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        return _is_bool_index(args[1])
    if func is aten.repeat_interleave.Tensor:
        return True  # the output size comes from the counts' values
    return False


class RefuseSyncOperators(TorchDispatchMode):
    """Raises :class:`SyncPointRefused` for an operator that would synchronise."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _refused_operator(func, args):
            raise SyncPointRefused(f"{func} synchronises with the host (a CUDA graph capture refuses it)")
        return func(*args, **(kwargs or {}))


class GetitemWatch(TorchFunctionMode):
    """Calls ``check(name, args, kwargs)`` at every ``tensor[index]`` in the block."""

    def __init__(self, check):
        super().__init__()
        self.check = check

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            self.check("__getitem__", args, kwargs or {})
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_sync_points(refuse: bool = False):
    """Yields a list that collects a :class:`SyncPoint` for every synchronising call in the block;
    with ``refuse`` such a call raises :class:`SyncPointRefused` instead."""
    found: list[SyncPoint] = []
    originals = {}

    def check(name, args, kwargs, torch_function: bool = False):
        if _synchronises(name, (None, *args) if torch_function else args, kwargs):
            frame = traceback.extract_stack(limit=3)[0]  # the caller of the watched call
            point = SyncPoint(name, f"{frame.filename}:{frame.lineno}", id(args[0]) if args else None)
            if refuse:
                raise SyncPointRefused(f"{name} at {point.where} synchronises with the host")
            found.append(point)

    def wrap(owner, name):
        original = getattr(owner, name)
        originals[(owner, name)] = original
        running = []

        def counted(*args, **kwargs):
            if not running:  # the watch mode calls a method again by its (wrapped) name: count it once
                check(name, args, kwargs, owner is torch)
            running.append(name)
            try:
                return original(*args, **kwargs)
            finally:
                running.pop()

        setattr(owner, name, counted)

    for name in TENSOR_METHODS:
        wrap(torch.Tensor, name)
    for name in TORCH_FUNCTIONS:
        wrap(torch, name)
    try:
        with GetitemWatch(check):
            yield found
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


@contextlib.contextmanager
def refuse_sync_points():
    """Raise :class:`SyncPointRefused` at any call or operator in the block that would synchronise
    with the host, as a CUDA-graph capture does."""
    with count_sync_points(refuse=True), RefuseSyncOperators():
        yield
