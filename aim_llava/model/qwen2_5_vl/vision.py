"""Qwen2.5-VL's vision transformer, built from its config; checkpoint names ``visual.*``.

A temporal group (2 frames of a video, or an image repeated) of gh x gw patches is embedded by a
3-D convolution, runs through ``depth`` blocks (RMSNorm, attention with a 2-D rotary embedding
over the patch's (row, column), SwiGLU MLP) and leaves through the patch merger, which turns every
2x2 block of patches into one token of the LLM's width. Attention never crosses groups: blocks in
``fullatt_block_indexes`` attend over the whole group, the others within windows of
``window_size`` pixels. So all groups of one video (same grid) run as one batch.

The patches arrive in the processor's order (each 2x2 block's four patches together, blocks in
raster order); inside the tower they are kept in window order (the blocks of each window
together, windows in raster order, as transformers orders them), and the merged tokens are put
back in raster order of the merged grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aim_llava.model.attention import attend
from aim_llava.model.language_model.modeling_qwen2 import Qwen2RMSNorm, rotate_half
from aim_llava.model.qwen2_5_vl.config import Qwen2_5_VLVisionConfig

VISION_NORM_EPS = 1e-6  # Qwen2.5-VL's vision RMSNorms do not read the config's epsilon


@dataclass
class WindowLayout:
    """Where a group's patches sit inside the tower, for a grid of ``grid`` (rows, columns) patches.

    ``order`` [N]: the patch (processor order) at each place of the window order; ``windows``:
    per window length, the start of every window of that length ([count] each); ``rows``,
    ``columns`` [N]: each place's patch coordinates, for the rotary embedding.
    """

    order: torch.Tensor
    windows: dict[int, torch.Tensor]
    rows: torch.Tensor
    columns: torch.Tensor


def window_layout(grid: tuple[int, int], merge: int, window: int, device: torch.device) -> WindowLayout:
    """The window order of a grid of patches (``merge`` x ``merge`` patches a token, windows of
    ``window`` x ``window`` tokens, cut at the grid's right and bottom edges)."""
    rows, columns = grid
    token_rows, token_columns = rows // merge, columns // merge
    tokens = torch.arange(token_rows * token_columns).view(token_rows, token_columns)
    starts, lengths, blocks = [], [], []
    place = 0
    for top in range(0, token_rows, window):
        for left in range(0, token_columns, window):
            block = tokens[top : top + window, left : left + window].flatten()
            blocks.append(block)
            starts.append(place)
            lengths.append(block.numel() * merge * merge)
            place += lengths[-1]
    token_order = torch.cat(blocks)
    unit = merge * merge
    order = (token_order[:, None] * unit + torch.arange(unit)).flatten()
    # patch coordinates in the processor's order: token (i, j) holds patches (merge i + a, merge j + b)
    token_row = torch.arange(token_rows).repeat_interleave(token_columns)
    token_column = torch.arange(token_columns).repeat(token_rows)
    inner_row = torch.arange(merge).repeat_interleave(merge)
    inner_column = torch.arange(merge).repeat(merge)
    patch_rows = (token_row[:, None] * merge + inner_row).flatten()
    patch_columns = (token_column[:, None] * merge + inner_column).flatten()
    windows: dict[int, list[int]] = {}
    for start, length in zip(starts, lengths):
        windows.setdefault(length, []).append(start)
    return WindowLayout(order.to(device), {length: torch.tensor(s, device=device) for length, s in windows.items()},
                        patch_rows[order].to(device), patch_columns[order].to(device))


class VisionRotaryEmbedding:
    """The 2-D rotary embedding: the first quarter of each head's pairs turn with the patch's row,
    the second quarter with its column (then both halves alike), at frequencies for head_dim / 2."""

    def __init__(self, head_dim: int, theta: float):
        self.half = head_dim // 2
        self.theta = theta

    def __call__(self, rows: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, head_dim] in float32 for patch coordinates ``rows``, ``columns`` [N]."""
        exponent = torch.arange(0, self.half, 2, dtype=torch.float, device=rows.device) / self.half
        inv_freq = 1.0 / (self.theta**exponent)
        angles = torch.cat([rows[:, None].float() * inv_freq, columns[:, None].float() * inv_freq], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


class VisionAttention(nn.Module):
    def __init__(self, config: Qwen2_5_VLVisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, windows: dict[int, torch.Tensor] | None,
                attn_implementation: str) -> torch.Tensor:
        """x [G, N, C] (window order); ``windows`` None: attention over the whole group."""
        groups, n, _ = x.shape
        q, k, v = self.qkv(x).view(groups, n, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [G, heads, N, d]
        scale = self.head_dim**-0.5
        if windows is None:
            out = attend(q, k, v, None, False, scale, attn_implementation)
        else:
            out = torch.empty_like(q)
            for length, starts in windows.items():
                index = (starts[:, None] + torch.arange(length, device=x.device)).flatten()
                pick = lambda t: t[:, :, index].unflatten(2, (len(starts), length)).transpose(1, 2).flatten(0, 1)  # noqa: E731
                result = attend(pick(q), pick(k), pick(v), None, False, scale, attn_implementation)
                out[:, :, index] = result.unflatten(0, (groups, len(starts))).transpose(1, 2).flatten(2, 3)
        return self.proj(out.transpose(1, 2).reshape(groups, n, -1))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of x [G, N, heads, d], computed in float32 as transformers does."""
    dtype = x.dtype
    x = x.float()
    return (x * cos[:, None] + rotate_half(x) * sin[:, None]).to(dtype)


class VisionMLP(nn.Module):
    def __init__(self, config: Qwen2_5_VLVisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, config: Qwen2_5_VLVisionConfig):
        super().__init__()
        self.norm1 = Qwen2RMSNorm(config.hidden_size, VISION_NORM_EPS)
        self.norm2 = Qwen2RMSNorm(config.hidden_size, VISION_NORM_EPS)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x, cos, sin, windows, attn_implementation):
        x = x + self.attn(self.norm1(x), cos, sin, windows, attn_implementation)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: Qwen2_5_VLVisionConfig):
        super().__init__()
        self.config = config
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, channels * temporal * patch * patch] -> [N, hidden]."""
        c = self.config
        patches = patches.view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        return self.proj(patches.to(self.proj.weight.dtype)).view(-1, c.hidden_size)


class PatchMerger(nn.Module):
    def __init__(self, config: Qwen2_5_VLVisionConfig):
        super().__init__()
        self.width = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = Qwen2RMSNorm(config.hidden_size, VISION_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[G, N, C] -> [G, N / merge^2, out] (each merge^2 consecutive patches one token)."""
        return self.mlp(self.ln_q(x).reshape(x.shape[0], -1, self.width))


class Qwen2_5_VisionTransformer(nn.Module):
    def __init__(self, config: Qwen2_5_VLVisionConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.attn_implementation = attn_implementation
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        self.rotary = VisionRotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, patches: torch.Tensor, groups: int, grid: tuple[int, int]) -> torch.Tensor:
        """Patches [groups * rows * columns, patch values] of ``groups`` groups of a ``grid`` of
        (rows, columns) patches -> tokens [groups, rows * columns / merge^2, out] in raster order."""
        c = self.config
        merge = c.spatial_merge_size
        if grid[0] % merge or grid[1] % merge:
            raise ValueError(f"a grid of {grid[0]}x{grid[1]} patches cannot be merged {merge}x{merge}")
        layout = window_layout(grid, merge, c.window_tokens, patches.device)
        x = self.patch_embed(patches).view(groups, grid[0] * grid[1], c.hidden_size)[:, layout.order]
        cos, sin = self.rotary(layout.rows, layout.columns)
        for index, block in enumerate(self.blocks):
            windows = None if index in c.fullatt_block_indexes else layout.windows
            x = block(x, cos, sin, windows, self.attn_implementation)
        tokens = self.merger(x)
        unit = merge * merge
        token_order = layout.order[::unit] // unit  # the merged token at each place of the window order
        return tokens[:, torch.argsort(token_order)]
