"""Moving host data to the model's device without stalling it.

A plain ``tensor.to("cuda")`` from pageable memory waits for the GPU to finish what it is doing;
from pinned memory with ``non_blocking=True`` the copy is queued like a kernel, so the host keeps
launching work. Every host -> device copy on the inference path goes through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``, queued without a host-device synchronisation."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def host_values(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small tensor of Python values on ``device`` (see :func:`to_device`)."""
    return to_device(torch.tensor(list(values), dtype=dtype), device)
