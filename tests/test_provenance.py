"""Where each visual token comes from (aim_llava.reduction.provenance), against recomputations
written here from docs/algorithms.md: which pooled tokens each merge step averaged into each
output (§2, with Python sets), which cells bilinear pooling and the anyres downscale read most
(§1, PyTorch's align_corners=False sampling written out per axis), and the anyres layout (base
view, then the crop grid unpadded to the image's aspect ratio, a newline ending each row)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import plan, random_frames, random_image

from aim_llava.mm_utils import process_images, select_best_resolution
from aim_llava.reduction.merge import merge_state

GRID = 27  # patches a side of a view (SigLIP at 384 px)
POOLED = 14  # tokens a side of a pooled frame


def reference_merge_groups(frame: torch.Tensor, steps: list[int], order: str = "published") -> list[set[int]]:
    """For one frame, the set of input tokens each output token holds, following §2's words with
    lists: sources even, targets odd, each source's first most similar target, the r best
    sources merged into their targets, unmerged sources (best first) then targets."""
    tokens, members, positions = list(frame.double()), [{i} for i in range(frame.shape[0])], list(range(frame.shape[0]))
    for r in steps:
        r = min(r, len(tokens) // 2)
        if r <= 0:
            continue
        sources, targets = list(range(0, len(tokens), 2)), list(range(1, len(tokens), 2))
        best = []
        for s in sources:
            sims = [F.cosine_similarity(tokens[s], tokens[t], dim=0).item() for t in targets]
            j = max(range(len(targets)), key=lambda i: (sims[i], -i))
            best.append((sims[j], s, j))
        ordered = sorted(best, key=lambda item: -item[0])
        into = {j: [] for j in range(len(targets))}
        for _, s, j in ordered[:r]:
            into[j].append(s)
        out = [(tokens[s], members[s], positions[s]) for _, s, _ in ordered[r:]]
        for j, t in enumerate(targets):
            group = [t] + into[j]
            out.append((torch.stack([tokens[i] for i in group]).mean(dim=0), set().union(*(members[i] for i in group)),
                        positions[t]))
        if order == "spatial":
            out.sort(key=lambda item: item[2])
        tokens, members, positions = [x[0] for x in out], [x[1] for x in out], [x[2] for x in out]
    return members


def token_of_member(groups: list[set[int]], count: int) -> list[int]:
    owner = [-1] * count
    for token, members in enumerate(groups):
        for member in members:
            owner[member] = token
    return owner


def bilinear_readers(size_in: int, size_out: int) -> list[set[int]]:
    """Along one axis: the output indices whose bilinear (align_corners=False) weight on each
    input index is largest (all of those within float32 rounding of the largest, which the
    model's float32 weights may order either way; empty when none reads it)."""
    weights = np.zeros((size_in, size_out))
    for out in range(size_out):
        source = max((out + 0.5) * size_in / size_out - 0.5, 0.0)
        low = int(math.floor(source))
        high = min(low + 1, size_in - 1)
        weights[low, out] += 1 - (source - low)
        weights[high, out] += source - low
    return [set(np.flatnonzero(row >= row.max() - 1e-6)) if row.max() > 0 else set() for row in weights]


def grid_readers(rows_in, columns_in, rows_out, columns_out) -> list[set[int]]:
    """Per input cell (raster order), the raster indices of the output cells reading it most."""
    rows, columns = bilinear_readers(rows_in, rows_out), bilinear_readers(columns_in, columns_out)
    return [{r * columns_out + c for r in row for c in column} for row in rows for column in columns]


@pytest.mark.parametrize("steps, order", [([98, 49], "published"), ([30], "published"), ([40, 20], "spatial")])
def test_merge_origin_holds_the_reference_groups(steps, order):
    frames = torch.randn(3, 196, 16, generator=torch.Generator().manual_seed(len(steps) + len(order)))
    state = merge_state(frames, steps, order=order, track=True)
    for frame, origin in zip(frames, state.origin):
        assert origin.tolist() == token_of_member(reference_merge_groups(frame, steps, order), 196)
    assert torch.equal(state.tokens, merge_state(frames, steps, order=order).tokens)  # tracking changes nothing


def video_origins(loaded, preset, frames=2, seed=4):
    _, model, processor, _ = loaded
    video = processor.preprocess(random_frames(frames, 64, 80, seed=seed))["pixel_values"]
    with torch.no_grad():
        features, origins = model.visual_features_with_origins([video], None, ["video"], plan(model, preset))
        patches = model.encode_images(video)
    return features[0], origins[0], patches


def test_video_cells_follow_pooling_then_merging(loaded):
    """aim_merge_only: each cell goes to the pooled token that reads it most, which goes to the
    merged token whose group holds it; the newline token stands for no cell."""
    features, origins, patches = video_origins(loaded, "aim_merge_only")
    hidden = patches.shape[-1]
    pooled = F.interpolate(patches.view(-1, GRID, GRID, hidden).permute(0, 3, 1, 2), size=(POOLED, POOLED),
                           mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(-1, POOLED**2, hidden)
    readers = grid_readers(GRID, GRID, POOLED, POOLED)
    expected = []
    for frame, tokens in enumerate(pooled):
        owner = token_of_member(reference_merge_groups(tokens, [98, 49]), POOLED**2)
        expected += [{frame * 49 + owner[read] for read in readers[cell]} for cell in range(GRID * GRID)]
    assert origins.num_tokens == features.shape[0] == 2 * 49 + 1
    assert all(token in allowed for token, allowed in zip(origins.token_of_cell.tolist(), expected, strict=True))
    assert origins.cells_per_token()[-1] == 0 and [g.picture for g in origins.grids] == [0, 1]


def test_random_drop_cells_keep_the_pooled_token_they_were(loaded):
    """random_25: a kept token is the pooled token of its cells, unchanged (its features say
    which); cells of dropped tokens are stood for by none."""
    features, origins, patches = video_origins(loaded, "random_25")
    pooled = F.interpolate(patches.view(-1, GRID, GRID, patches.shape[-1]).permute(0, 3, 1, 2), size=(POOLED, POOLED),
                           mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(-1, patches.shape[-1])
    readers = grid_readers(GRID, GRID, POOLED, POOLED)
    cells = origins.token_of_cell.view(2, GRID * GRID)
    for frame in range(2):
        for cell in range(GRID * GRID):
            token = int(cells[frame, cell])
            if token >= 0:
                assert any(torch.allclose(features[token], pooled[frame * POOLED**2 + read], atol=1e-5)
                           for read in readers[cell])
    held = set(cells[cells >= 0].tolist())
    assert held == set(range(origins.num_tokens - 1)) and (cells < 0).any()


def test_tower_pruning_cells_go_to_tokens_of_their_frame(loaded):
    """ficoco_v_25 (patches folded inside the tower, frames not pooled): every cell goes to a
    token of its own frame, every token but the newline holds some."""
    features, origins, _ = video_origins(loaded, "ficoco_v_25")
    per_frame = (features.shape[0] - 1) // 2
    cells = origins.token_of_cell.view(2, GRID * GRID)
    assert ((cells >= 0) & (cells // per_frame == torch.arange(2)[:, None])).all()
    assert (origins.cells_per_token()[:-1] > 0).all() and origins.cells_per_token()[-1] == 0


@pytest.mark.parametrize("size", [(700, 300), (3000, 1000)])  # the second is downscaled (more than 9 crops' worth)
def test_anyres_cells_follow_the_unpadded_downscaled_crop_grid(loaded, size):
    _, model, processor, _ = loaded
    image = random_image(*size, seed=2)
    pixels = process_images([image], processor, model.config)[0]
    with torch.no_grad():
        features, origins = model.visual_features_with_origins([pixels], [size], ["image"], plan(model, "baseline"))
    features, origins = features[0], origins[0]
    width, height = size
    canvas_width, canvas_height = select_best_resolution(size, model.config.image_grid_pinpoints)
    rows, columns = canvas_height // 384 * GRID, canvas_width // 384 * GRID
    # unpadding (§1): keep the rows (or columns) that the image covers once fitted into the canvas
    if width / height > columns / rows:
        kept_rows = int(round(height * columns / width, 7))
        top, left, kept_columns = (rows - kept_rows) // 2, 0, columns
        kept_rows = rows - 2 * top
    else:
        kept_columns = int(round(width * rows / height, 7))
        top, left, kept_rows = 0, (columns - kept_columns) // 2, rows
        kept_columns = columns - 2 * left
    times = math.sqrt(kept_rows * kept_columns / (9 * GRID * GRID))
    out_rows, out_columns = (int(kept_rows // times), int(kept_columns // times)) if times > 1.1 else \
        (kept_rows, kept_columns)
    readers = grid_readers(kept_rows, kept_columns, out_rows, out_columns)
    expected = [{cell} for cell in range(GRID * GRID)]
    for row in range(rows):
        for column in range(columns):
            inside = top <= row < top + kept_rows and left <= column < left + kept_columns
            reads = readers[(row - top) * kept_columns + (column - left)] if inside else set()
            expected.append({GRID * GRID + read // out_columns * (out_columns + 1) + read % out_columns
                             for read in reads} or {-1})
    assert [(g.rows, g.columns, g.kind) for g in origins.grids] == [(GRID, GRID, "view"), (rows, columns, "crops")]
    assert origins.num_tokens == features.shape[0] == GRID * GRID + out_rows * (out_columns + 1)
    assert all(token in allowed for token, allowed in zip(origins.token_of_cell.tolist(), expected, strict=True))
    assert (times > 1.1) == (size == (3000, 1000))
