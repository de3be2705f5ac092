"""Data parallelism under an existing launcher (torchrun, ``accelerate launch``).

The launcher sets RANK, WORLD_SIZE and LOCAL_RANK; each process takes every WORLD_SIZE-th item,
writes its own records, and rank 0 merges them after a barrier. On GPUs each process uses the GPU
of its local rank and makes it its current device before anything touches CUDA (see
:mod:`aim_llava.devices`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Shard:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_environment(cls) -> Shard:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def take(self, items: list) -> list:
        return items[self.rank :: self.world]

    def start(self, device: str) -> str:
        """Join the process group (gloo on CPU, nccl on GPU); returns the device to use: with
        ``auto`` or ``cuda``, the GPU of this process's local rank (made current, and the
        group's device)."""
        if self.world == 1:
            return device
        import torch
        import torch.distributed as dist

        from aim_llava.devices import make_current

        cuda = torch.cuda.is_available()
        if cuda and device in ("auto", "cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        if not (cuda and device.startswith("cuda")):
            dist.init_process_group("gloo")
            return device
        make_current(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
        return device

    def wait_for_all(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def finish(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
