"""Every reduction on Qwen2.5-VL: AIM's merging per temporal group (tokens keep their grid cells and
so their (t, h, w)), AIM's pruning, FastV, FitPrune and FiCoCo-L inside the LLM against float64
references that rotate the tapped projections with multimodal RoPE at the tokens' 3-D positions,
the baselines, and FiCoCo-V refused."""

import json

import pytest
import torch
from conftest import plan, random_frames
from test_merge import reference_step
from test_pruning_oracle import (
    AIM_MARGIN,
    ATTENTION_MARGIN,
    ProjectionTap,
    aim_importance,
    cut,
    fitprune_scores,
    published_retention,
    rows_at,
    softmax,
)

from aim_llava.errors import InputError
from aim_llava.mm_utils import tokenizer_image_token
from aim_llava.model.families import family_of


def question_ids(qwen25, question="Describe the video in detail.", modality="video"):
    tokenizer, model, processor, _ = qwen25
    text = family_of(model.config).prompt([(question, None)], modality, None, "qwen_1_5", tokenizer, processor)
    return torch.tensor([tokenizer_image_token(text, tokenizer)])


def video(qwen25, frames=4, height=224, width=224, seed=3):
    return qwen25[2].video(random_frames(frames, height, width, seed=seed), "cpu", torch.float32, 2.0)


def mrope_heads(projection, positions, text):
    """[heads, N, d] in float64: the projection split into heads, rotated at ``positions`` [N, 3]
    (time, height, width): rotary pair i turns with the axis whose mrope_section it falls in."""
    d = text.head_dim
    x = projection.view(projection.shape[0], -1, d).transpose(0, 1)
    inverse = text.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    axis = torch.tensor([a for a, size in enumerate(text.mrope_section) for _ in range(size)])
    angles = positions[:, axis].double() * inverse
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def logits_at(tap, model, layer, positions):
    text = model.config.text
    q = mrope_heads(tap.q[layer], positions, text)
    k = mrope_heads(tap.k[layer], positions, text).repeat_interleave(text.num_attention_heads // text.num_key_value_heads, 0)
    return q @ k.transpose(-1, -2) / text.head_dim**0.5


def tapped(model, ids, clip, reduction, layers):
    with ProjectionTap(model, layers) as tap, torch.no_grad():
        out = model(ids, images=[clip], reduction=reduction)
    assert sorted(out.reduction.kept) == layers
    return out, tap, out.inputs.visual[0], out.inputs.position_ids[0]


# AIM's merging per temporal group ---------------------------------------------------------------


def test_merging_is_per_group_and_tokens_keep_their_destination_cell(qwen25):
    """Each 2-frame group merged as docs/algorithms.md §2 merges a frame (a loop reference), 25%:
    64 -> 32 -> 16 tokens; every token's (t, h, w) is that of the cell it kept."""
    _, model, _, _ = qwen25
    clip = video(qwen25, frames=6)
    with torch.no_grad():
        grouped = model.encode_images(clip)
        merged = model.video_features(grouped, plan(model, "aim_merge_only"))
    groups, rows, columns = grouped.grid
    assert (groups, rows, columns) == (3, 8, 8) and len(merged) == 3 * 16
    for g in range(groups):
        tokens, cells = list(grouped.features[g]), list(range(rows * columns))
        for r in (32, 16):
            tokens, cells = reference_step(tokens, cells, r)
        assert torch.allclose(merged.embeds[16 * g : 16 * (g + 1)], torch.stack(tokens), atol=1e-6)
        expected = torch.tensor([[g, c // columns, c % columns] for c in cells])
        assert torch.equal(merged.cells[16 * g : 16 * (g + 1)], expected)
    ids = question_ids(qwen25)
    with torch.no_grad():
        inputs = model.prepare_multimodal_inputs(ids, visual_features=[merged])
    start = ids[0].tolist().index(-200)
    times = torch.tensor([0, 2, 4])  # 1 s a group x 2 tokens a second
    expected = torch.stack([times[merged.cells[:, 0]], merged.cells[:, 1], merged.cells[:, 2]], dim=-1) + start
    assert torch.equal(inputs.position_ids[0, start : start + len(merged)], expected)
    # the question keeps its unreduced positions: the block spans its whole 8 x 8 grid
    assert inputs.position_ids[0, start + len(merged), 0] == start + 8


def test_image_merging_uses_image_merge_ratio(qwen25):
    _, model, processor, _ = qwen25
    image = processor.image(random_frames(1, 224, 224, seed=2)[0], "cpu")
    with torch.no_grad():
        untouched = model.visual_features([image], reduction=plan(model, "aim_merge_only"))[0]
        merged = model.visual_features([image], reduction=plan(model, {"method": "aim", "image_merge_ratio": 0.5,
                                                                      "prune": None}))[0]
    assert len(untouched) == 64 and len(merged) == 32


# pruning inside the LLM -----------------------------------------------------------------------


@pytest.mark.parametrize("preset, mode", [("aim_default", "remove"), ("aim_default_mask", "mask")])
def test_aim_keeps_the_top_tokens_of_the_reference_importance(qwen25, preset, mode):
    _, model, _, _ = qwen25
    ids, clip = question_ids(qwen25), video(qwen25, frames=8, seed=5)
    layers = [3, 4, 5]
    out, tap, visual, positions3 = tapped(model, ids, clip, plan(model, preset), layers)
    n, n_visual = visual.shape[0], int(visual.sum())
    assert n_visual == 4 * 16
    alive = torch.ones(n, dtype=torch.bool)
    for layer in layers:
        present, rows = rows_at(alive, mode)
        scores = torch.zeros(n, dtype=torch.float64)
        scores[rows] = aim_importance(logits_at(tap, model, layer, positions3[rows]), alive[present])
        scores[~alive] = -1.0
        scores[~visual] = 1.0
        n_text = n - n_visual
        keep = cut(scores, torch.ones(n, dtype=torch.bool), int(n_visual * published_retention(layer)) + n_text,
                   AIM_MARGIN)
        assert torch.equal(out.reduction.kept[layer][0], keep), f"layer {layer}"
        alive = keep


@pytest.mark.parametrize("mode", ["remove", "mask"])
def test_fitprune_drops_the_lowest_reference_scores(qwen25, tmp_path, mode):
    _, model, _, _ = qwen25
    ids, clip = question_ids(qwen25, "What is happening in this clip?"), video(qwen25, frames=4, seed=6)
    drop = [0, 30, 0, 20, 20, 0]
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"drop": drop, "visual_tokens": 128}))
    layers = [layer for layer, count in enumerate(drop) if count]
    reduction = plan(model, {"method": "fitprune", "recipe": str(recipe), "prune_mode": mode})
    out, tap, visual, positions3 = tapped(model, ids, clip, reduction, layers)
    n = visual.shape[0]
    alive = torch.ones(n, dtype=torch.bool)
    for layer in layers:
        present, rows = rows_at(alive, mode)
        probabilities = softmax(logits_at(tap, model, layer, positions3[rows]), alive[present])
        scores = torch.zeros(n, dtype=torch.float64)
        scores[rows] = fitprune_scores(probabilities, alive[present], visual[present],
                                       int(visual[present].nonzero()[0]))
        live_visual = alive & visual
        keep = cut(scores, live_visual, int(live_visual.sum()) - drop[layer], ATTENTION_MARGIN) | (alive & ~visual)
        assert torch.equal(out.reduction.kept[layer][0], keep), f"layer {layer}"
        alive = keep


@pytest.mark.parametrize("mode", ["remove", "mask"])
def test_fastv_keeps_what_the_last_token_attends_to(qwen25, mode):
    _, model, _, _ = qwen25
    ids, clip = question_ids(qwen25, "What moves?"), video(qwen25, frames=4, seed=7)
    out, tap, visual, positions3 = tapped(model, ids, clip, plan(model, {"method": "fastv", "prune_mode": mode}), [1])
    probabilities = softmax(logits_at(tap, model, 1, positions3), torch.ones_like(visual))[:, -1].mean(dim=0)
    keep = cut(probabilities, visual, int(visual.sum()) // 2, ATTENTION_MARGIN) | ~visual
    assert torch.equal(out.reduction.kept[1][0], keep)


@pytest.mark.parametrize("mode", ["remove", "mask"])
def test_ficoco_l_removes_the_reference_tokens(qwen25, mode):
    _, model, _, _ = qwen25
    ids, clip = question_ids(qwen25, "What is happening?"), video(qwen25, frames=4, seed=4)
    config = {"method": "ficoco_l", "start_layer": 2, "end_layer": 2, "keep_ratio": 0.5, "prune_mode": mode}
    out, tap, visual, positions3 = tapped(model, ids, clip, plan(model, config), [2])
    a = softmax(logits_at(tap, model, 2, positions3), torch.ones_like(visual)).mean(dim=0)
    text = ~visual
    later_text = text & (visual.cumsum(dim=0) > 0)
    redundancy = 0.6 * a[visual].mean(dim=0) - 0.4 * a[later_text].mean(dim=0)
    removed = cut(redundancy, visual, int(visual.sum()) - int(visual.sum()) // 2, ATTENTION_MARGIN)
    assert torch.equal(out.reduction.kept[2][0], ~removed)


@pytest.mark.parametrize("method", [{"method": "fastv"}, {"method": "ficoco_l", "keep_ratio": 0.5}])
def test_removing_carries_positions_and_equals_masking(qwen25, method):
    """Remove mode drops the pruned rows with their (t, h, w); the rows left keep the positions of
    the prompt rows they came from, and the last token's logits equal mask mode's (where the
    same rows are kept and the pruned ones only masked)."""
    _, model, _, _ = qwen25
    ids, clip = question_ids(qwen25, "Where is it?"), video(qwen25, frames=4, seed=9)
    with torch.no_grad():
        removed = model(ids, images=[clip], reduction=plan(model, {**method, "prune_mode": "remove"}))
        masked = model(ids, images=[clip], reduction=plan(model, {**method, "prune_mode": "mask"}))
    assert removed.reduction.kept.keys() == masked.reduction.kept.keys()
    for layer, kept in removed.reduction.kept.items():
        assert torch.equal(kept, masked.reduction.kept[layer])
    state = removed.state
    rows = state.original_index[0][state.valid[0]]
    assert len(rows) < removed.inputs.position_ids.shape[1]
    assert torch.equal(state.position_ids[0][state.valid[0]], removed.inputs.position_ids[0][rows])
    assert (removed.logits[0, -1] - masked.logits[0, -1]).abs().max() <= 1e-4


@pytest.mark.parametrize("preset", ["aim_default", "fastv_default", "ficoco_l_25"])
def test_cached_decoding_equals_recomputation_and_batches_equal_single_runs(qwen25, preset):
    """The pruned KV cache with decoded positions after the prompt's largest one gives the tokens
    of recomputing everything (replaying the pruning), and a padded batch those of single runs."""
    _, model, processor, _ = qwen25
    clips = [video(qwen25, frames=4, seed=10), processor.image(random_frames(1, 140, 196, seed=11)[0], "cpu")]
    prompts = [question_ids(qwen25, "What happens in this video?")[0],
               question_ids(qwen25, "Color?", modality="image")[0]]
    reduction = plan(model, preset)
    single = [model.generate(p[None], images=[c], max_new_tokens=5, eos_token_id=[], reduction=reduction)
              for p, c in zip(prompts, clips)]
    uncached = model.generate(prompts[0][None], images=[clips[0]], max_new_tokens=5, eos_token_id=[],
                              reduction=reduction, use_cache=False)
    assert torch.equal(single[0], uncached)
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(2, longest, dtype=torch.long)
    mask = torch.zeros(2, longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):], mask[b, longest - len(p):] = p, 1
    batch = model.generate(ids, attention_mask=mask, images=clips, max_new_tokens=5, eos_token_id=[],
                           reduction=reduction)
    assert torch.equal(batch, torch.cat(single))


# baselines before the LLM, and what cannot apply ---------------------------------------------------


def test_random_and_pooling_baselines_keep_cells(qwen25):
    """Random keeps a sorted subset of each group's cells; pooling averages regions in the group's
    aspect ratio and keeps each region's middle cell (4 x 8 tokens, 25%: 2 x 4 regions of 2 x 2)."""
    _, model, _, _ = qwen25
    clip = video(qwen25, frames=2, height=112, width=224, seed=12)
    with torch.no_grad():
        grouped = model.encode_images(clip)
        randomly = model.video_features(grouped, plan(model, "random_25"))
        pooled = model.video_features(grouped, plan(model, "pool_25"))
    assert grouped.grid == (1, 4, 8)
    features = grouped.features[0].view(4, 8, -1)
    cells = randomly.cells[:, 1] * 8 + randomly.cells[:, 2]
    assert len(randomly) == 8 and torch.equal(cells, cells.sort().values)
    assert torch.equal(randomly.embeds, features.flatten(0, 1)[cells])
    blocks = features.view(2, 2, 4, 2, -1).mean(dim=(1, 3)).flatten(0, 1)
    assert torch.allclose(pooled.embeds, blocks, atol=1e-6)
    assert pooled.cells[:, 1].tolist() == [r * 2 for r in range(2) for _ in range(4)]
    assert pooled.cells[:, 2].tolist() == [c * 2 for _ in range(2) for c in range(4)]


def test_ficoco_v_is_refused_by_name(qwen25):
    _, model, _, _ = qwen25
    with pytest.raises(InputError) as error:
        model(question_ids(qwen25), images=[video(qwen25, frames=2)], reduction=plan(model, "ficoco_v_25"))
    assert "FiCoCo-V" in str(error.value) and "ficoco_l_25" in str(error.value) and "\n" not in str(error.value)
