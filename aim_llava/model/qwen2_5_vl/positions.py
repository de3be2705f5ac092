"""Qwen2.5-VL's multimodal RoPE positions: every token gets (time, height, width).

* Text tokens have three equal positions, one more than the token before (the first is 0).
* A visual block starting at position s (the next text position): the token of group g, row i,
  column j of the merged grid has (s + floor(g x interval), s + i, s + j), where interval =
  ``tokens_per_second`` x the seconds a group spans, computed in float32 as transformers does
  (an image has one group: time s).
* After a visual block, text goes on from the largest position the block's whole grid reaches,
  plus one: s + max(floor((G - 1) x interval), rows - 1, columns - 1) + 1. This is Qwen2.5-VL's
  own rule (its release code, transformers up to 5.2, vLLM); transformers 5.24 continues from
  s + max(rows, columns) instead, which differs only for videos whose time positions run past
  their height and width. The grid decides it, not the tokens kept: after AIM's merging or
  pruning the question keeps the positions it has without reduction.
* Generated tokens continue from the prompt's largest position plus one (transformers' rope deltas).

A token merged or kept by a reduction keeps its own cell (:class:`VisualTokens`), so its
positions are those of the cell it stands for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.tensors import to_device


@dataclass
class VisualTokens:
    """A video's or image's tokens for the LLM: ``embeds`` [N, H] and, for each, the cell of the
    merged grid it stands for, ``cells`` [N, 3] (group, row, column); ``grid`` (groups, rows,
    columns) is the whole grid, ``seconds_per_group`` the time one group spans (0 for an image).
    A cell is ``merge`` x ``merge`` patches of its group; every cell a merged token stands for is
    in the encoding's :class:`~aim_llava.reduction.provenance.TokenOrigins` (``with_origins``)."""

    embeds: torch.Tensor
    cells: torch.Tensor
    grid: tuple[int, int, int]
    modality: str
    seconds_per_group: float = 0.0

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.embeds.shape

    @property
    def nbytes(self) -> int:
        return self.embeds.nbytes + self.cells.nbytes


def group_times(groups: int, seconds_per_group: float, tokens_per_second: float) -> torch.Tensor:
    """[groups] long: each group's time position relative to the block's start."""
    interval = torch.tensor(seconds_per_group, dtype=torch.float32) * tokens_per_second
    return (torch.arange(groups) * interval).long()


def block_offsets(tokens: VisualTokens, tokens_per_second: float) -> tuple[torch.Tensor, int]:
    """([N, 3] long on the tokens' device: each token's positions relative to the block's start,
    the block's span: how far the next text moves on)."""
    groups, rows, columns = tokens.grid
    times = group_times(groups, tokens.seconds_per_group, tokens_per_second)
    span = max(int(times[-1]), rows - 1, columns - 1) + 1
    cells = tokens.cells
    offsets = torch.stack([to_device(times, cells.device)[cells[:, 0]], cells[:, 1], cells[:, 2]], dim=-1)
    return offsets, span


def rope_positions(sequences: list[list[int]], visuals: list[VisualTokens], longest: int, tokens_per_second: float,
                   device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Positions [B, longest, 3] of the left-padded batch of ``sequences`` whose every
    ``IMAGE_TOKEN_INDEX`` stands for the next of ``visuals`` (padding rows get 0), and each
    sample's next position (where generated tokens start). Text positions are laid out on the
    host; each visual block's are added on the device."""
    positions = torch.zeros(len(sequences), longest, 3, dtype=torch.long)
    blocks, next_positions, visual_index = [], [], 0
    for row, sequence in enumerate(sequences):
        length = len(sequence) - sequence.count(IMAGE_TOKEN_INDEX) + sum(
            len(visuals[visual_index + k]) for k in range(sequence.count(IMAGE_TOKEN_INDEX)))
        slot, position = longest - length, 0
        for token in sequence:
            if token == IMAGE_TOKEN_INDEX:
                offsets, span = block_offsets(visuals[visual_index], tokens_per_second)
                blocks.append((row, slot, position, offsets))
                slot += len(visuals[visual_index])
                position += span
                visual_index += 1
            else:
                positions[row, slot] = position
                slot += 1
                position += 1
        next_positions.append(position)
    positions = to_device(positions, device)
    for row, slot, start, offsets in blocks:
        positions[row, slot : slot + len(offsets)] = offsets + start
    return positions, next_positions
