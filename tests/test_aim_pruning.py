"""AIM inside the model: schedules, remove vs mask, cache, batches, configuration errors."""

import pytest
import torch
from conftest import left_padded_batch, plan, prompt_ids, random_frames, random_image

from aim_llava import load_pretrained_model
from aim_llava.errors import AimLlavaError
from aim_llava.mm_utils import process_images
from aim_llava.reduction.plan import ReplayReducer

GEN = dict(max_new_tokens=10, eos_token_id=[])


@pytest.fixture(scope="module")
def models(tiny_qwen_dir):
    """Two private copies of the tiny model: sdpa (the default) and eager attention."""
    sdpa = load_pretrained_model(tiny_qwen_dir, device_map="cpu", torch_dtype="float32")
    eager = load_pretrained_model(tiny_qwen_dir, device_map="cpu", torch_dtype="float32", attn_implementation="eager")
    return sdpa, eager


@pytest.fixture(scope="module")
def video_prompt(models):
    tokenizer, _, processor, _ = models[0]
    video = processor.preprocess(random_frames(32, 64, 80, seed=21))["pixel_values"]
    return prompt_ids(tokenizer, "Describe the video in detail."), video


def forward(model, ids, video, **kwargs):
    with torch.no_grad():
        return model(ids, images=[video], modalities=["video"], **kwargs)


def expected_counts(visual: int, num_layers: int, start: int, step: float = 0.125) -> list[int]:
    """Visual tokens entering each layer under the published schedule, computed independently."""
    counts = [visual]
    for layer in range(num_layers - 1):
        keep = 1.0 if layer < start else max(0.0, 1.0 - (layer - start + 1) * step)
        counts.append(int(visual * keep))
    return counts


@pytest.mark.parametrize("spec, start", [("aim_default", 3), ({"method": "aim", "prune_start": 0}, 0)])
def test_token_counts_follow_schedule(models, video_prompt, spec, start):
    _, model, _, _ = models[0]
    ids, video = video_prompt
    out = forward(model, ids, video, reduction=plan(model, spec))
    visual = 32 * 49 + 1  # 49 tokens a frame after merging to 25%, plus the newline token
    counts = [layer[0] for layer in out.reduction.visual_tokens_per_layer]
    assert counts == expected_counts(visual, 6, start)
    text = ids.shape[1] - 1
    assert out.logits.shape[1] == text + int(visual * (1 - (5 - start + 1) * 0.125))  # removed for real


def test_first_pruning_layer_keeps_same_tokens_in_both_modes(models, video_prompt):
    _, model, _, _ = models[1]  # eager, so the layers before pruning compute identical bits
    ids, video = video_prompt
    removed = forward(model, ids, video, reduction=plan(model, "aim_default")).reduction.kept
    masked = forward(model, ids, video, reduction=plan(model, "aim_default_mask")).reduction.kept
    assert sorted(removed) == sorted(masked) == [3, 4, 5]
    assert torch.equal(removed[3], masked[3])
    assert removed[3].sum() < removed[3].numel()


def test_same_kept_sets_give_same_logits_and_generation(models, video_prompt):
    _, model, _, _ = models[0]
    ids, video = video_prompt
    mask_plan = plan(model, "aim_default_mask")
    mask_out = forward(model, ids, video, reduction=mask_plan)
    mask_tokens = model.generate(ids, images=[video], modalities=["video"], reduction=mask_plan, **GEN)
    kept = mask_out.reduction.kept
    replaying = plan(model, "aim_default")
    replaying.layer_reducer = lambda num_layers: ReplayReducer(kept, "remove")
    remove_out = forward(model, ids, video, reduction=replaying)
    remove_tokens = model.generate(ids, images=[video], modalities=["video"], reduction=replaying, **GEN)
    text = mask_out.inputs.valid[0] & ~mask_out.inputs.visual[0]
    mask_text_logits = mask_out.logits[0][text]
    rows = remove_out.state.original_index[0]
    remove_text_logits = remove_out.logits[0][text[rows]]
    assert remove_out.logits.shape[1] < mask_out.logits.shape[1]
    assert remove_text_logits.shape == mask_text_logits.shape
    assert (remove_text_logits - mask_text_logits).abs().max() <= 1e-4
    assert torch.equal(remove_tokens, mask_tokens)


@pytest.mark.parametrize("preset", ["aim_default", "aim_default_mask"])
def test_cached_generation_equals_recomputation(models, video_prompt, preset):
    _, model, _, _ = models[0]
    reduction = plan(model, preset)
    ids, video = video_prompt
    cached = model.generate(ids, images=[video], modalities=["video"], use_cache=True, reduction=reduction, **GEN)
    recomputed = model.generate(ids, images=[video], modalities=["video"], use_cache=False, reduction=reduction, **GEN)
    assert torch.equal(cached, recomputed)


def test_batch_with_different_video_lengths_equals_single_runs(models):
    tokenizer, model, processor, _ = models[0]
    reduction = plan(model, {"method": "aim", "prune_start": 1})
    videos = [processor.preprocess(random_frames(n, 64, 80, seed=n))["pixel_values"] for n in (3, 8)]
    prompts = [prompt_ids(tokenizer, "What is shown?"), prompt_ids(tokenizer, "Describe every person you see.")]
    ids, mask = left_padded_batch(prompts)
    batched = model.generate(ids, attention_mask=mask, images=videos, modalities=["video"] * 2, reduction=reduction,
                             return_dict_in_generate=True, **GEN)
    batch_counts = batched.reduction.visual_tokens_per_layer
    for i in range(2):
        single = model.generate(prompts[i], images=[videos[i]], modalities=["video"], reduction=reduction,
                                return_dict_in_generate=True, **GEN)
        assert torch.equal(batched.sequences[i], single.sequences[0])
        assert [layer[i] for layer in batch_counts] == [layer[0] for layer in single.reduction.visual_tokens_per_layer]


def test_image_merging_and_pruning(models):
    tokenizer, model, processor, _ = models[0]
    image = random_image(700, 400, seed=3)
    pixels = process_images([image], processor, model.config)
    ids = prompt_ids(tokenizer, "What is this?")
    with torch.no_grad():
        full = model(ids, images=pixels, image_sizes=[image.size]).inputs.visual.sum().item()
        merged = model(ids, images=pixels, image_sizes=[image.size],
                       reduction=plan(model, {"method": "aim", "image_merge_ratio": 0.5, "prune_start": 2}))
    counts = [layer[0] for layer in merged.reduction.visual_tokens_per_layer]
    assert counts[0] == full - full // 2
    assert counts[3] == int(counts[0] * 0.875) and counts[5] == int(counts[0] * 0.625)


@pytest.mark.parametrize(
    "reduction, message",
    [
        ({"method": "aim", "merge_ratio": 1.5}, "merge_ratio=1.5 must lie in (0, 1]"),
        ({"method": "aim", "merge_ratio": 0}, "merge_ratio=0 must lie in (0, 1]"),
        ({"method": "aim", "prune_start": 40}, "prune_start=40 is beyond the model's 6 layers"),
        ({"method": "aim", "merge_rate": 0.5}, "unknown key 'merge_rate'"),
        ({"method": "aim", "prune_mode": "drop"}, "prune_mode='drop'"),
        ({"method": "aim", "prune": "explicit", "prune_retention": [1, 1, 0.5]}, "has 3 values but the model has 6"),
        ("aim_fastest", "unknown preset 'aim_fastest'"),
        ({"method": "aim", "importance_chunk_size": -5}, "importance_chunk_size=-5 must be at least 1"),
        ({"method": "aim", "importance_kernel": "fastest"}, "importance_kernel='fastest' is not one of"),
    ],
)
def test_config_errors_are_clear(tiny_qwen_dir, reduction, message):
    with pytest.raises(AimLlavaError) as info:
        load_pretrained_model(tiny_qwen_dir, device_map="cpu", overwrite_config={"reduction": reduction})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_overwrite_config_selects_reduction(tiny_qwen_dir):
    _, model, _, _ = load_pretrained_model(tiny_qwen_dir, device_map="cpu", overwrite_config={"reduction": "aim_default"})
    assert model.default_reduction.name == "aim_default" and model.default_reduction.schedule.prunes_after(3)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_every_importance_kernel_keeps_the_same_tokens(models):
    tokenizer, model, processor, _ = models[0]
    video = processor.preprocess(random_frames(4, 64, 80, seed=8))["pixel_values"]
    ids = prompt_ids(tokenizer, "Describe.")
    kept = {}
    for kernel in ("chunked", "factored", "flex"):
        reduction = plan(model, {"method": "aim", "prune_start": 1, "importance_kernel": kernel})
        kept[kernel] = forward(model, ids, video, reduction=reduction).reduction.kept
    assert sorted(kept["flex"]) == [1, 2, 3, 4, 5]
    for kernel in ("chunked", "factored"):
        assert all(torch.equal(kept["flex"][layer], kept[kernel][layer]) for layer in kept["flex"]), kernel
