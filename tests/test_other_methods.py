"""FastV and the frame baselines (random dropping, spatial pooling) against independent code,
plus cache and batch consistency for every method."""

import pytest
import torch
from conftest import left_padded_batch, plan, prompt_ids, random_frames

from aim_llava import load_pretrained_model
from aim_llava.flops import flops_report, resolve_architecture
from aim_llava.reduction.config import load_reduction_config
from aim_llava.reduction.methods.fastv import FastVPruner
from aim_llava.reduction.methods.frame_baselines import (
    FrameBaselineOptions,
    RandomDropPlan,
    SpatialPoolPlan,
)

GEN = dict(max_new_tokens=8, eos_token_id=[])
METHOD_CONFIGS = {
    "fastv": {"method": "fastv", "layer": 2, "drop_ratio": 0.5},
    "fastv_mask": {"method": "fastv", "layer": 2, "drop_ratio": 0.5, "prune_mode": "mask"},
    "random": {"method": "random", "keep_ratio": 0.25},
    "pool": {"method": "pool", "keep_ratio": 0.25},
    "ficoco_l": {"method": "ficoco_l", "start_layer": 2, "end_layer": 3, "keep_ratio": 0.5},
    "ficoco_v": {"method": "ficoco_v", "vision_start_layer": 0, "vision_keep_ratio": 0.3},
    "ficoco_vl": {"method": "ficoco_v", "vision_start_layer": 1, "vision_keep_ratio": 0.5, "llm": True,
                  "start_layer": 2, "keep_ratio": 0.5},
}


@pytest.fixture(scope="module")
def tiny(tiny_qwen_dir):
    return load_pretrained_model(tiny_qwen_dir, device_map="cpu", torch_dtype="float32")


@pytest.fixture(scope="module")
def video_prompt(tiny):
    tokenizer, _, processor, _ = tiny
    return prompt_ids(tokenizer, "What happens in the video?"), processor.preprocess(random_frames(6, 64, 80))["pixel_values"]


def test_fastv_keeps_what_the_last_token_attends_to(tiny, video_prompt, monkeypatch):
    _, model, _, _ = tiny
    ids, video = video_prompt
    seen = {}
    original = FastVPruner.after_layer

    def spy(self, layer, state, attention):
        if attention is not None:
            seen.update(q=attention.q.clone(), k=attention.k.clone(), scale=attention.scale,
                        visual=state.visual.clone(), layer=layer)
        return original(self, layer, state, attention)

    monkeypatch.setattr(FastVPruner, "after_layer", spy)
    with torch.no_grad():
        out = model(ids, images=[video], modalities=["video"], reduction=plan(model, METHOD_CONFIGS["fastv"]))
    assert seen["layer"] == 1
    # independent: softmax row of the last token per head, mean over heads, top half of the visual
    q, k = seen["q"][0], seen["k"][0].repeat_interleave(2, dim=0)
    probs = torch.softmax((q[:, -1:] @ k.transpose(-1, -2))[:, 0] * seen["scale"], dim=-1).mean(dim=0)
    visual = seen["visual"][0].nonzero().flatten()
    top = visual[probs[visual].topk(len(visual) // 2).indices]
    kept = out.reduction.kept[1][0]
    assert set(kept.nonzero().flatten().tolist()) == set(top.tolist()) | set((~seen["visual"][0]).nonzero().flatten().tolist())
    counts = [layer[0] for layer in out.reduction.visual_tokens_per_layer]
    assert counts == [len(visual)] * 2 + [len(visual) // 2] * 4


def test_spatial_pooling_is_the_block_average():
    frames = torch.randn(3, 196, 5)
    pooled = SpatialPoolPlan(FrameBaselineOptions(keep_ratio=0.25), 6).reduce_video_frames(frames)
    grid = frames.view(3, 14, 14, 5)
    blocks = grid.view(3, 7, 2, 7, 2, 5).mean(dim=(2, 4)).reshape(3, 49, 5)
    assert torch.allclose(pooled, blocks, atol=1e-6)


def test_random_drop_matches_merging_count_and_keeps_order():
    frames = torch.arange(196, dtype=torch.float32)[None, :, None].repeat(4, 1, 2)
    dropping = RandomDropPlan(FrameBaselineOptions(keep_ratio=0.125, seed=3), 6)
    kept = dropping.reduce_video_frames(frames)
    assert kept.shape == (4, 25, 2)  # AIM's 12.5% merge also keeps 25 of 196
    for frame in kept[..., 0]:
        assert torch.all(frame[1:] > frame[:-1])  # a subset, in the original order
    assert not torch.equal(kept[0], kept[1])  # frames draw different tokens
    assert torch.equal(kept, dropping.reduce_video_frames(frames))  # deterministic for a seed


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_cached_generation_equals_recomputation(tiny, video_prompt, name):
    _, model, _, _ = tiny
    kwargs = dict(images=[video_prompt[1]], modalities=["video"], reduction=plan(model, METHOD_CONFIGS[name]), **GEN)
    cached = model.generate(video_prompt[0], use_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(video_prompt[0], use_cache=False, **kwargs))


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_batch_equals_single_runs(tiny, name):
    tokenizer, model, processor, _ = tiny
    model.set_reduction(plan(model, METHOD_CONFIGS[name]))  # the model's default, used by calls without one
    videos = [processor.preprocess(random_frames(n, 64, 80, seed=n))["pixel_values"] for n in (2, 5)]
    prompts = [prompt_ids(tokenizer, "What is shown?"), prompt_ids(tokenizer, "Describe every person you see.")]
    ids, mask = left_padded_batch(prompts)
    batched = model.generate(ids, attention_mask=mask, images=videos, modalities=["video"] * 2, **GEN)
    for i in range(2):
        single = model.generate(prompts[i], images=[videos[i]], modalities=["video"], **GEN)
        assert torch.equal(batched[i], single[0])


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_flops_counts_match_the_model(tiny, tiny_qwen_dir, video_prompt, name):
    _, model, _, _ = tiny
    config = load_reduction_config(METHOD_CONFIGS[name])
    ids, video = video_prompt
    with torch.no_grad():
        out = model(ids, images=[video], modalities=["video"], reduction=config.build(6))
    recorded = [layer[0] for layer in out.reduction.visual_tokens_per_layer]
    arch_name, arch = resolve_architecture(str(tiny_qwen_dir / "config.json"))
    report = flops_report(arch_name, arch, config, frames=6, text_tokens=ids.shape[1] - 1)
    assert [n - (ids.shape[1] - 1) for n in report.tokens_per_layer] == recorded


def test_fastv_option_errors(tiny_qwen_dir):
    from aim_llava.errors import AimLlavaError

    for bad, message in [({"method": "fastv", "layer": 9}, "beyond the model's 6 layers"),
                         ({"method": "fastv", "layer": 0}, "at least 1"),
                         ({"method": "fastv", "drop_ratio": 1.5}, "drop_ratio=1.5")]:
        with pytest.raises(AimLlavaError, match=message):
            load_pretrained_model(tiny_qwen_dir, device_map="cpu", overwrite_config={"reduction": bad})
