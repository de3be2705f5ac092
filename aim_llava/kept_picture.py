"""A picture of what token reduction kept: the pictures the model saw, each cut into its grid of
cells, every cell coloured by the visual token that stands for it (one colour per token, so the
patches that pooling or merging folded together share a colour, with an outline around each
token's cells); cells of tokens pruned inside the LLM by the chosen layer are dimmed, cells that
no token stands for (dropped or cropped before the LLM) are dark.

It draws :class:`~aim_llava.reduction.provenance.TokenOrigins` (what the model recorded while
encoding) and one layer's alive mask from the call's
:class:`~aim_llava.reduction.plan.ReductionRecord`; it computes nothing about the reduction.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from PIL import Image

from aim_llava.reduction.provenance import CellGrid, TokenOrigins

GOLDEN = 0.6180339887498949
TINT = 0.45  # how much of a live token's colour covers its cells
DIMMED = 0.22  # brightness left to the cells of a pruned token
DROPPED = 0.08  # brightness left to cells no token stands for
GAP = 4  # pixels between tiles


def token_colours(count: int) -> np.ndarray:
    """[count, 3] float colours; neighbouring token indices get far-apart hues."""
    colours = [colorsys.hsv_to_rgb((index * GOLDEN) % 1.0, 0.75, 1.0) for index in range(count)]
    return np.asarray(colours, dtype=np.float32).reshape(count, 3) * 255


def grid_tile(picture: np.ndarray, grid: CellGrid, tokens: torch.Tensor, alive: torch.Tensor, colours: np.ndarray,
              width: int) -> np.ndarray:
    """One grid drawn over its picture, ``width`` pixels wide: [h, width, 3] uint8."""
    left, top, right, bottom = grid.box
    picture_height, picture_width = picture.shape[:2]
    height = max(1, round(width * (bottom - top) * picture_height / ((right - left) * picture_width)))
    scaled_width = max(1, round(width / (right - left)))
    scaled_height = max(1, round(height / (bottom - top)))
    scaled = np.asarray(Image.fromarray(picture).resize((scaled_width, scaled_height), Image.BILINEAR))
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    x0, y0 = round(-left * scaled_width), round(-top * scaled_height)
    xs, ys = slice(max(0, x0), min(width, x0 + scaled_width)), slice(max(0, y0), min(height, y0 + scaled_height))
    canvas[ys, xs] = scaled[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    rows = np.minimum(np.arange(height) * grid.rows // height, grid.rows - 1)
    columns = np.minimum(np.arange(width) * grid.columns // width, grid.columns - 1)
    pixel_tokens = tokens.numpy()[rows[:, None], columns[None, :]]
    held = pixel_tokens >= 0
    live = np.zeros_like(held)
    live[held] = alive.cpu().numpy()[pixel_tokens[held]]
    colour = colours[np.where(held, pixel_tokens, 0)]
    out = np.where(live[..., None], canvas * (1 - TINT) + colour * TINT, canvas * DIMMED)
    out = np.where(held[..., None], out, canvas * DROPPED)
    edges = np.zeros_like(held)
    edges[:, :-1] |= pixel_tokens[:, :-1] != pixel_tokens[:, 1:]
    edges[:-1, :] |= pixel_tokens[:-1, :] != pixel_tokens[1:, :]
    out[edges] *= 0.35
    return out.clip(0, 255).astype(np.uint8)


def kept_picture(pictures: list[np.ndarray], origins: TokenOrigins, alive: torch.Tensor, tile_width: int = 160,
                 per_row: int = 8) -> Image.Image:
    """Every grid of ``origins`` over its picture (``pictures[grid.picture]``, [H, W, 3] uint8),
    tokens alive where ``alive`` [origins.num_tokens] says so, as tiles in rows of ``per_row``."""
    colours = token_colours(max(1, origins.num_tokens))
    tiles = [grid_tile(pictures[grid.picture], grid, origins.grid_tokens(index), alive, colours, tile_width)
             for index, grid in enumerate(origins.grids)]
    per_row = min(per_row, len(tiles))
    lines = [tiles[start : start + per_row] for start in range(0, len(tiles), per_row)]
    heights = [max(tile.shape[0] for tile in line) for line in lines]
    canvas = np.full((sum(heights) + GAP * (len(lines) - 1), per_row * tile_width + GAP * (per_row - 1), 3), 255,
                     dtype=np.uint8)
    y = 0
    for line, height in zip(lines, heights):
        for column, tile in enumerate(line):
            x = column * (tile_width + GAP)
            canvas[y : y + tile.shape[0], x : x + tile_width] = tile
        y += height + GAP
    return Image.fromarray(canvas)


def thumbnail(picture: np.ndarray, longest: int) -> np.ndarray:
    """A picture scaled so that its longer side is at most ``longest`` pixels."""
    height, width = picture.shape[:2]
    scale = longest / max(height, width)
    if scale >= 1:
        return picture
    size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))
