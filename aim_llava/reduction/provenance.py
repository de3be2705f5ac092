"""Where each visual token comes from: the cells (patches) of the pictures the model saw.

A model family encodes a video or an image as groups of cells, each a grid over one picture
(LLaVA-OneVision: a 27 x 27 grid of patches per video frame; an image's whole view and its crop
grid; Qwen2.5-VL: the merged grid of each sampled frame, 2 x 2 patches a cell), and every step
that pools, merges, drops or lays out tokens before the LLM says which output token each of its
input tokens went to. An :class:`OriginTrace` follows one visual through those steps; its
result, :class:`TokenOrigins`, maps every cell to the visual token that stands for it (several
cells per token after pooling or merging; none for a cell that was dropped or cropped away).
Which of those tokens each LLM layer kept is in the call's
:class:`~aim_llava.reduction.plan.ReductionRecord` (:meth:`~aim_llava.reduction.plan.ReductionRecord.visual_alive`).

Tracing is asked for per call; a call that does not ask pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CellGrid:
    """A grid of ``rows`` x ``columns`` cells over picture ``picture`` of a clip (the index of a
    sampled frame; 0 for an image). ``box`` is the part of the picture the grid covers, as
    (left, top, right, bottom) fractions of its width and height (beyond 0..1 where the picture
    was padded before encoding). ``kind`` names what the grid is ("frame", "view", "crops")."""

    picture: int
    rows: int
    columns: int
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    kind: str = "frame"

    @property
    def cells(self) -> int:
        return self.rows * self.columns


@dataclass
class TokenOrigins:
    """Which visual token each cell went into: ``token_of_cell`` [cells] (the grids' cells in
    order, each grid in raster order; -1: the cell is stood for by no token), over the
    ``num_tokens`` visual tokens of one image or video, in the order they enter the LLM."""

    grids: list[CellGrid]
    token_of_cell: torch.Tensor
    num_tokens: int

    def grid_tokens(self, index: int) -> torch.Tensor:
        """[rows, columns]: the token of each cell of grid ``index``."""
        start = sum(grid.cells for grid in self.grids[:index])
        grid = self.grids[index]
        return self.token_of_cell[start : start + grid.cells].view(grid.rows, grid.columns)

    def cells_per_token(self) -> torch.Tensor:
        """[num_tokens]: how many cells each token stands for (0 for a newline token)."""
        held = self.token_of_cell[self.token_of_cell >= 0]
        return torch.bincount(held, minlength=self.num_tokens)


class OriginTrace:
    """Follows the tokens of one visual through the steps that build it. The tokens start as the
    grids' cells, in order; each step reports where its input tokens went."""

    def __init__(self, grids: list[CellGrid]):
        self.grids = list(grids)
        self.num_tokens = sum(grid.cells for grid in self.grids)
        self.token_of_cell = torch.arange(self.num_tokens)
        self.unreported: str | None = None

    def reassign(self, assignment: torch.Tensor, tokens_after: int) -> None:
        """A step over all tokens: ``assignment`` [tokens before] gives each input token's output
        token (0 <= index < ``tokens_after``), or -1 when it was dropped."""
        assignment = assignment.detach().to("cpu", torch.long).flatten()
        if assignment.numel() != self.num_tokens:
            self.lost(f"a step reported {assignment.numel()} tokens where there were {self.num_tokens}")
            return
        held = self.token_of_cell >= 0
        self.token_of_cell = torch.where(held, assignment[self.token_of_cell.clamp(min=0)], -1)
        self.num_tokens = tokens_after

    def regroup(self, assignment: torch.Tensor, tokens_per_group_after: int) -> None:
        """A step within equal groups of consecutive tokens (a video's frames): ``assignment``
        [groups, tokens a group] gives each input token's output token within its group, or -1."""
        groups = assignment.shape[0]
        offsets = torch.arange(groups, device=assignment.device)[:, None] * tokens_per_group_after
        within = torch.where(assignment >= 0, assignment + offsets, -1)
        self.reassign(within, groups * tokens_per_group_after)

    def append(self, count: int) -> None:
        """``count`` tokens added after the others that stand for no cell (LLaVA's newline)."""
        self.num_tokens += count

    def settle(self, tokens: int) -> None:
        """A step has produced ``tokens`` tokens: if the trace counts otherwise, the step did not
        report where its tokens went, and the origins are unknown from here on."""
        if tokens != self.num_tokens:
            self.lost(f"a step made {tokens} tokens out of {self.num_tokens} without saying how")

    def lost(self, reason: str) -> None:
        self.unreported = self.unreported or reason

    def origins(self) -> TokenOrigins | None:
        """The result, or None when a step did not report."""
        if self.unreported is not None:
            return None
        return TokenOrigins(self.grids, self.token_of_cell, self.num_tokens)


def strongest_reader(step: Callable[[torch.Tensor], torch.Tensor], count: int,
                     dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The assignment of a linear step over groups of ``count`` tokens (bilinear or average
    pooling: ``step`` maps [G, count, C] to [G, count', C]): each input token goes to the output
    token that weighs it most (the first of equals), or -1 when no output reads it. Found by
    running the step itself on one-hot tokens, so it follows whatever the step computes."""
    basis = torch.eye(count, dtype=dtype, device=device)[:, :, None]
    weights = step(basis)[..., 0].abs().float().cpu()  # [input token, output token]
    return torch.where(weights.amax(dim=1) > 0, weights.argmax(dim=1), -1)


def kept_assignment(kept: torch.Tensor, count: int) -> torch.Tensor:
    """[G, count]: for tokens kept at positions ``kept`` [G, count'] (output token k is input
    token kept[g, k]), each input token's output token, or -1 when it was dropped."""
    assignment = torch.full((kept.shape[0], count), -1, dtype=torch.long, device=kept.device)
    order = torch.arange(kept.shape[1], device=kept.device).expand_as(kept)
    return assignment.scatter(1, kept.long(), order)
