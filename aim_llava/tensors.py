"""Moving host data to the model's device without stalling it.

A plain ``tensor.to("cuda")`` from pageable memory waits for the GPU to finish what it is doing;
from pinned memory with ``non_blocking=True`` the copy is queued like a kernel, so the host keeps
launching work. Every host -> device copy on the inference path goes through here. Where the
system refuses pinned memory (container limits, some virtualised or WSL setups), the copies come
from ordinary memory for the rest of the process (the same values, the host waits for each copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aim_llava.capabilities import RUNTIME_FALLBACKS


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``, queued without a host-device synchronisation."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return page_locked(tensor).to(device, non_blocking=True)


def page_locked(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned copy of the host ``tensor``, or ``tensor`` itself once pinning has failed."""
    return RUNTIME_FALLBACKS.run("pinned host memory", tensor.pin_memory, lambda: tensor,
                                 "ordinary memory (each copy to the GPU waits for the host)")


def host_values(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small tensor of Python values on ``device`` (see :func:`to_device`)."""
    return to_device(torch.tensor(list(values), dtype=dtype), device)
