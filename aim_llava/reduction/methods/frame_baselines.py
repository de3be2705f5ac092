"""Fair baselines before the LLM: random token dropping and uniform spatial pooling per frame,
at the same per-frame count as AIM's merging for the same ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aim_llava.reduction.merge import merge_steps_for_ratio
from aim_llava.reduction.plan import ReductionPlan
from aim_llava.reduction.provenance import OriginTrace, kept_assignment, strongest_reader
from aim_llava.reduction.schedule import ScheduleError
from aim_llava.tensors import to_device


@dataclass(frozen=True)
class FrameBaselineOptions:
    """keep_ratio: share of each frame's tokens kept (same count as merging at this ratio);
    seed: random dropping's seed (the same tokens are dropped for the same input shape)."""

    keep_ratio: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ScheduleError(f"keep_ratio={self.keep_ratio} must lie in (0, 1]")


def matched_count(tokens_per_frame: int, ratio: float) -> int:
    """The per-frame count AIM's merging keeps at this ratio."""
    return tokens_per_frame - sum(merge_steps_for_ratio(tokens_per_frame, ratio))


def pooled_grid(count: int) -> tuple[int, int]:
    """A near-square grid with about ``count`` cells."""
    rows = max(1, math.isqrt(count))
    return rows, max(1, round(count / rows))


class RandomDropPlan(ReductionPlan):
    """Keep a random subset of each frame's tokens (in their original order)."""

    def __init__(self, options: FrameBaselineOptions, num_layers: int, name: str = "random"):
        self.name, self.options = name, options

    def frame_tokens_after_merging(self, tokens_per_frame: int) -> int:
        return matched_count(tokens_per_frame, self.options.keep_ratio)

    def kept(self, frames: torch.Tensor) -> torch.Tensor:
        """[F, count]: the positions each frame keeps, in order."""
        count = self.frame_tokens_after_merging(frames.shape[1])
        generator = torch.Generator().manual_seed(self.options.seed)
        return to_device(torch.stack([torch.randperm(frames.shape[1], generator=generator)[:count].sort().values
                                      for _ in range(frames.shape[0])]), frames.device)

    def reduce_video_frames(self, frames: torch.Tensor, trace: OriginTrace | None = None) -> torch.Tensor:
        return self.reduce_video_groups(frames, (1, frames.shape[1]), trace)[0]

    def reduce_video_groups(self, tokens: torch.Tensor, grid: tuple[int, int], trace: OriginTrace | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.kept(tokens)
        if trace is not None:
            trace.regroup(kept_assignment(keep, tokens.shape[1]), keep.shape[1])
        return tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1])), keep


class SpatialPoolPlan(ReductionPlan):
    """Average-pool each frame's token grid to a near-square grid of about the matched count."""

    def __init__(self, options: FrameBaselineOptions, num_layers: int, name: str = "pool"):
        self.name, self.options = name, options

    def frame_tokens_after_merging(self, tokens_per_frame: int) -> int:
        rows, cols = pooled_grid(matched_count(tokens_per_frame, self.options.keep_ratio))
        return rows * cols

    def reduce_video_frames(self, frames: torch.Tensor, trace: OriginTrace | None = None) -> torch.Tensor:
        count, side = frames.shape[1], math.isqrt(frames.shape[1])
        if side * side != count:
            raise ScheduleError(f"spatial pooling needs square frame grids, got {count} tokens")
        size = pooled_grid(matched_count(count, self.options.keep_ratio))

        def pool(tokens: torch.Tensor) -> torch.Tensor:
            return self.pooled(tokens, (side, side), size)

        if trace is not None:
            trace.regroup(strongest_reader(pool, count)[None].expand(frames.shape[0], -1), size[0] * size[1])
        return pool(frames)

    def reduce_video_groups(self, tokens: torch.Tensor, grid: tuple[int, int], trace: OriginTrace | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group pooled to about the matched count of cells, in the group's aspect ratio; a
        pooled token keeps the cell at the middle of the region it averages (and, for ``trace``,
        stands for the cells it weighs most, as in :meth:`reduce_video_frames`)."""
        rows, columns = grid
        count = matched_count(rows * columns, self.options.keep_ratio)
        out_rows = min(rows, max(1, round(math.sqrt(count * rows / columns))))
        out_columns = min(columns, max(1, round(count / out_rows)))
        # adaptive pooling's region i covers [floor(i R / r), ceil((i + 1) R / r))
        middle = [(i * rows // out_rows + -(-(i + 1) * rows // out_rows) - 1) // 2 for i in range(out_rows)]
        centre = [(j * columns // out_columns + -(-(j + 1) * columns // out_columns) - 1) // 2
                  for j in range(out_columns)]
        cells = to_device(torch.tensor([r * columns + c for r in middle for c in centre]), tokens.device)
        size = (out_rows, out_columns)
        if trace is not None:
            reader = strongest_reader(lambda x: self.pooled(x, grid, size), rows * columns)
            trace.regroup(reader[None].expand(tokens.shape[0], -1), out_rows * out_columns)
        return self.pooled(tokens, grid, size), cells.expand(tokens.shape[0], -1)

    @staticmethod
    def pooled(frames: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """[F, rows x columns, C] on ``grid`` -> [F, size[0] x size[1], C] by adaptive average pooling."""
        maps = frames.transpose(1, 2).reshape(frames.shape[0], -1, *grid)
        pooled = F.adaptive_avg_pool2d(maps.float(), size).to(frames.dtype)
        return pooled.flatten(2).transpose(1, 2)
