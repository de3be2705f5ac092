"""FLOPs and budgets for Qwen2.5-VL (docs/algorithms.md §4 and §8): the published shapes, frames of
448 x 448 (256 tokens a 2-frame group), schedules starting at half the depth, and the token counts
the model really runs."""

import pytest
import torch
from conftest import random_frames

from aim_llava.architectures import architecture
from aim_llava.flops import flops_report
from aim_llava.model.qwen2_5_vl.processor import ProcessorSettings, Qwen2_5_VLProcessor
from aim_llava.reduction.budget import candidates, solve_budget
from aim_llava.reduction.config import load_reduction_config


def dense_prefill(hidden, kv, intermediate, tokens_per_layer):
    """2 n P + 4 n^2 H per layer, P = q, o, k, v, gate, up, down (docs/algorithms.md §4)."""
    params = hidden * hidden * 2 + hidden * kv * 2 + hidden * intermediate * 3
    return sum(2 * n * params + 4 * n * n * hidden for n in tokens_per_layer)


def test_seven_b_baseline_is_qwen2_7b_llm_over_2048_visual_tokens():
    report = flops_report("qwen2.5-vl-7b", architecture("qwen2.5-vl-7b"), load_reduction_config("baseline"), 16, 100)
    assert report.visual_tokens == 8 * 256
    assert report.prefill_tflops == pytest.approx(dense_prefill(3584, 512, 18944, [2148] * 28) / 1e12, rel=1e-12)


@pytest.mark.parametrize("arch, layers, start", [("qwen2.5-vl-3b", 36, 18), ("qwen2.5-vl-7b", 28, 14),
                                                 ("qwen2.5-vl-72b", 80, 40)])
def test_aim_default_merges_each_group_and_prunes_from_half_depth(arch, layers, start):
    config = architecture(arch)
    report = flops_report(arch, config, load_reduction_config("aim_default"), 16, 100)
    visual = 8 * 64  # 256 -> 128 -> 64 a group
    leaving = [100 + (visual if layer < start else int(visual * max(0.0, 1 - (layer - start + 1) * 0.125)))
               for layer in range(layers)]
    assert report.visual_tokens == visual and report.paper_tokens_per_layer == leaving
    assert report.tokens_per_layer == [visual + 100] + leaving[:-1]
    text = config.text
    kv = text.num_key_value_heads * text.head_dim
    assert report.prefill_tflops == pytest.approx(
        dense_prefill(text.hidden_size, kv, text.intermediate_size, leaving) / 1e12, rel=1e-12)


def test_vision_tower_flops_over_448_frames():
    """1024 patches a group: the 3-D patch embedding, 32 blocks (4 of full attention, 28 in 16
    windows of 64 patches), and the merger as the projector."""
    config = architecture("qwen2.5-vl-7b")
    report = flops_report("qwen2.5-vl-7b", config, load_reduction_config("baseline"), 4, 0)
    n, c, inner = 1024, 1280, 3420
    block = 2 * n * (4 * c * c + 3 * c * inner)
    per_group = 2 * n * 3 * 2 * 14 * 14 * c + 32 * block + 4 * 4 * n * n * c + 28 * 16 * 4 * 64 * 64 * c
    assert report.vision_tflops == pytest.approx(2 * per_group / 1e12, rel=1e-12)
    assert report.projector_tflops == pytest.approx(2 * 2 * 256 * (5120 * 5120 + 5120 * 3584) / 1e12, rel=1e-12)


def test_budget_picks_the_costliest_setting_within_it():
    config = architecture("qwen2.5-vl-3b")
    chosen = solve_budget("budget:0.15", config, 16)
    baseline = flops_report("", config, load_reduction_config("baseline"), 16, 100).prefill_tflops
    cost = flops_report("", config, chosen, 16, 100).prefill_tflops
    assert cost <= 0.15 * baseline
    costs = [flops_report("", config, c, 16, 100).prefill_tflops for c in candidates(config.text.num_hidden_layers)]
    assert cost == max(c for c in costs if c <= 0.15 * baseline + 1e-9)


@pytest.mark.parametrize("preset", ["baseline", "aim_default", "pool_25"])
def test_counts_are_those_the_model_runs_on_448_frames(qwen25, preset):
    """The tiny model on 5 frames of 448 x 448 (the published processor's bounds; the last frame
    repeated to fill a third group): the visual tokens entering each layer are the FLOPs report's."""
    tokenizer, model, _, _ = qwen25
    processor = Qwen2_5_VLProcessor(model.config.vision, ProcessorSettings())
    clip = processor.video(random_frames(5, 448, 448, seed=1), "cpu", torch.float32, 2.0)
    reduction = load_reduction_config(preset)
    with torch.no_grad():
        out = model(torch.tensor([[1, 3, -200, 4, 10, 11, 2]]), images=[clip],
                    reduction=reduction.build(model.config.text.num_hidden_layers))
    report = flops_report("tiny", model.config, reduction, 5, 0)
    assert [layer[0] for layer in out.reduction.visual_tokens_per_layer] == report.tokens_per_layer
