"""Binding work to one CUDA device when several are visible (``cuda:1``, torchrun's ranks >= 1).

PyTorch's operators follow their tensors' device, but some things follow the calling thread's
*current* CUDA device instead: Triton launches (on the current device's stream),
``torch.cuda.Stream()``, ``torch.cuda.current_stream()``, events recorded without a stream, and
CUDA-graph captures. With tensors on ``cuda:1`` and the current device 0, a kernel reads another
GPU's memory and a graph captures nothing. Loading makes the model's device current
(:func:`make_current`), and the model's entry points run under :func:`on_device` (the current
device is per thread: a server's model thread does not inherit the loader's).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import ContextManager, TypeVar

import torch

Method = TypeVar("Method", bound=Callable)


def make_current(device: torch.device | str) -> None:
    """Make a CUDA ``device`` the calling thread's current device (nothing for other devices)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def on_device(device: torch.device | str) -> ContextManager:
    """``torch.cuda.device(device)`` for a CUDA device: the block's current device; a no-op
    context for other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_own_device(method: Method) -> Method:
    """Run a method of an object with a ``device`` property under :func:`on_device` of it."""

    @functools.wraps(method)
    def bound(self, *args, **kwargs):
        with on_device(self.device):
            return method(self, *args, **kwargs)

    return bound
