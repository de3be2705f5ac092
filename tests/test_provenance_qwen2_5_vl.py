"""Where each visual token comes from on Qwen2.5-VL (the cells of the merged grid of every sampled
frame, docs/algorithms.md §8), against independent computations: which token a cell's pixels reach
through the real processor, tower and merger (with the tower's attention silenced, a token sees
only its own 2 x 2 patches of its two frames); the merge groups of §2 written with Python sets; the
pooling regions by arithmetic; and a reduction that does not report leaves the origins unknown."""

import pytest
import torch
from conftest import plan, random_frames
from test_provenance import reference_merge_groups, token_of_member

from aim_llava.model.builder import load_pretrained_model
from aim_llava.reduction.plan import ReductionPlan, grid_cells

HEIGHT, WIDTH = 112, 168  # already multiples of 28 within the tiny checkpoint's bounds: not resized
ROWS, COLUMNS = HEIGHT // 28, WIDTH // 28  # cells (merged tokens) a side
CELLS = ROWS * COLUMNS


def load(checkpoint):
    """(model, processor) of a checkpoint, float32."""
    _, model, processor, _ = load_pretrained_model(checkpoint, device_map="cpu", torch_dtype="float32")
    return model, processor


@pytest.fixture(scope="module")
def qwen(tiny_qwen25_dir):
    return load(tiny_qwen25_dir)


def encode(model, processor, frames, preset="baseline", modality="video"):
    visual = processor.video(frames, "cpu") if modality == "video" else processor.image(frames[0], "cpu")
    assert visual.grid == (2 * ROWS, 2 * COLUMNS)
    with torch.no_grad():
        features, origins = model.visual_features_with_origins([visual], None, [modality], plan(model, preset))
        unreduced = model.visual_features([visual], None, [modality], plan(model, "baseline"))[0].embeds
    return features[0].embeds, origins[0], unreduced


@pytest.mark.parametrize("modality, count", [("video", 3), ("image", 1)])
def test_each_cell_goes_to_the_token_its_pixels_reach(tiny_qwen25_dir, modality, count):
    """Reduction off: changing the pixels of one cell of one frame changes exactly the token the
    record gives that cell (3 frames: the last fills its group alone)."""
    silent, processor = load(tiny_qwen25_dir)
    with torch.no_grad():
        for block in silent.visual.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    frames = random_frames(count, HEIGHT, WIDTH, seed=5)
    features, origins, _ = encode(silent, processor, frames, modality=modality)
    groups = -(-count // 2)
    assert origins.num_tokens == features.shape[0] == groups * CELLS
    assert [(grid.picture, grid.rows, grid.columns) for grid in origins.grids] == \
        [(frame, ROWS, COLUMNS) for frame in range(count)]
    for frame in range(count):
        for row in range(ROWS):
            for column in range(COLUMNS):
                changed = frames.copy()
                changed[frame, 28 * row : 28 * row + 28, 28 * column : 28 * column + 28] ^= 0x80
                moved = (encode(silent, processor, changed, modality=modality)[0] - features).abs().amax(dim=1)
                reached = torch.nonzero(moved > 1e-5).flatten().tolist()
                assert reached == [int(origins.grid_tokens(frame)[row, column])], (frame, row, column)


def test_merged_tokens_hold_the_reference_groups(qwen):
    """aim_merge_only: each group's cells go to the merged token whose reference group (§2, on the
    unreduced tokens, 24 -> 12 -> 6) holds their token; both frames of a group alike."""
    model, processor = qwen
    features, origins, unreduced = encode(model, processor, random_frames(4, HEIGHT, WIDTH, seed=6), "aim_merge_only")
    owners = [token_of_member(reference_merge_groups(unreduced[g * CELLS : (g + 1) * CELLS], [12, 6]), CELLS)
              for g in range(2)]
    expected = [g * 6 + owners[g][cell] for frame in range(4) for g in [frame // 2] for cell in range(CELLS)]
    assert origins.num_tokens == features.shape[0] == 12
    assert origins.token_of_cell.tolist() == expected


def test_random_drop_keeps_cells_of_the_tokens_it_kept(qwen):
    """random_25: a cell's token is its own unreduced token, unchanged; 6 of 24 a group kept."""
    model, processor = qwen
    features, origins, unreduced = encode(model, processor, random_frames(4, HEIGHT, WIDTH, seed=7), "random_25")
    cells = origins.token_of_cell.view(4, CELLS)
    for frame in range(4):
        for cell in range(CELLS):
            token = int(cells[frame, cell])
            if token >= 0:
                assert token // 6 == frame // 2
                assert torch.equal(features[token], unreduced[frame // 2 * CELLS + cell])
    assert torch.equal(cells[0], cells[1]) and torch.equal(cells[2], cells[3])
    assert sorted(set(cells[cells >= 0].tolist())) == list(range(12)) and int((cells[0] >= 0).sum()) == 6


def test_pooled_tokens_stand_for_their_regions(qwen):
    """pool_25: a 4 x 6 group pooled to 2 x 3 regions of 2 x 2 cells; each token is the mean of the
    cells the record gives it."""
    model, processor = qwen
    features, origins, unreduced = encode(model, processor, random_frames(2, HEIGHT, WIDTH, seed=8), "pool_25")
    expected = [row // 2 * 3 + column // 2 for row in range(ROWS) for column in range(COLUMNS)]
    assert origins.token_of_cell.tolist() == expected * 2
    for token in range(6):
        members = [cell for cell, owner in enumerate(expected) if owner == token]
        assert torch.allclose(features[token], unreduced[members].mean(dim=0), atol=1e-5)


class HalvingPlan(ReductionPlan):
    """Drops every second token of a group without saying so."""

    name = "halving"

    def reduce_video_groups(self, tokens, grid, trace=None):
        return tokens[:, ::2], grid_cells(tokens)[:, ::2]


def test_a_reduction_that_does_not_report_has_no_origins(qwen):
    model, processor = qwen
    visual = processor.video(random_frames(2, HEIGHT, WIDTH, seed=9), "cpu")
    with torch.no_grad():
        features, origins = model.visual_features_with_origins([visual], None, ["video"], HalvingPlan())
    assert features[0].embeds.shape[0] == CELLS // 2 and origins == [None]
