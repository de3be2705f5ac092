"""Counting the host-device synchronisation points of a block of code, on any device.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` reports every synchronising call; on the
CPU nothing synchronises, so the calls that would are counted where Python reaches them: reading
a tensor's values into Python (``item``, ``tolist``, ``bool``/``int``/``float``, ``numpy``,
``cpu``), data-dependent shapes (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``, ``repeat_interleave`` with tensor counts).
"""

from __future__ import annotations

import contextlib
import traceback
from typing import NamedTuple

import torch

TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero",
                  "masked_select", "unique", "__getitem__", "__setitem__", "repeat_interleave")
TORCH_FUNCTIONS = ("nonzero", "masked_select", "unique", "repeat_interleave", "argwhere")


class SyncPoint(NamedTuple):
    call: str
    where: str
    tensor: int | None  # id() of the tensor the call was made on


def _is_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _synchronises(name: str, args) -> bool:
    if name in ("__getitem__", "__setitem__"):
        return _is_bool_index(args[1])
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else None
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1
    return True


@contextlib.contextmanager
def count_sync_points():
    """Yields a list that collects a :class:`SyncPoint` for every synchronising call in the block."""
    found: list[SyncPoint] = []
    originals = {}

    def wrap(owner, name):
        original = getattr(owner, name)
        originals[(owner, name)] = original

        def counted(*args, **kwargs):
            if _synchronises(name, (None, *args) if owner is torch else args):
                frame = traceback.extract_stack(limit=2)[0]
                found.append(SyncPoint(name, f"{frame.filename}:{frame.lineno}", id(args[0]) if args else None))
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    for name in TENSOR_METHODS:
        wrap(torch.Tensor, name)
    for name in TORCH_FUNCTIONS:
        wrap(torch, name)
    try:
        yield found
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
