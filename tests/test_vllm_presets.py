"""Which reductions the vLLM plugin accepts (aim_llava.vllm_plugin.presets; no vLLM needed): those
acting on video frames before the LLM; a preset acting inside the LLM or the vision tower, or on
image tokens, is refused with its name. The plugin itself is tested in tests_vllm/ (its own
environment, scripts/run_vllm_tests.sh)."""

from types import SimpleNamespace

import pytest
import torch
import yaml

from aim_llava.reduction.config import preset_files
from aim_llava.reduction.plan import ReductionPlan
from aim_llava.vllm_plugin.presets import (
    UnsupportedReductionError,
    frame_reduction_plan,
    frame_tokens,
    plan_from_hf_config,
    preset_of_index,
    reduce_frames,
    request_preset_index,
    supported_presets,
)

LAYERS = 6


def acts_before_the_llm_only(values: dict) -> bool:
    """From a preset's YAML: frame baselines, no reduction, or AIM without pruning or image merging."""
    method = values.get("method", "none")
    if method in ("none", "pool", "random"):
        return True
    return method == "aim" and values.get("prune", "published") is None and values.get("image_merge_ratio") is None


PRESETS = {name: yaml.safe_load(entry.read_text()) for name, entry in preset_files().items()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_accepted_exactly_when_they_act_before_the_llm(name):
    if acts_before_the_llm_only(PRESETS[name]):
        plan = frame_reduction_plan(name, LAYERS)
        frames = torch.randn(3, 196, 8, generator=torch.Generator().manual_seed(0))
        assert plan.reduce_video_frames(frames).shape == (3, plan.frame_tokens_after_merging(196), 8)
        assert name in supported_presets(LAYERS)
    else:
        with pytest.raises(UnsupportedReductionError, match=f"'{name}'"):
            frame_reduction_plan(name, LAYERS)
        assert name not in supported_presets(LAYERS)


def test_where_a_refused_reduction_acts_is_named():
    with pytest.raises(UnsupportedReductionError, match="inside the LLM"):
        frame_reduction_plan("fastv_default", LAYERS)
    with pytest.raises(UnsupportedReductionError, match="inside the vision tower"):
        frame_reduction_plan("ficoco_v_25", LAYERS)
    images = {"name": "merge_images", "method": "aim", "merge_ratio": 0.25, "prune": None, "image_merge_ratio": 0.5}
    with pytest.raises(UnsupportedReductionError, match="'merge_images'.*on image tokens"):
        frame_reduction_plan(images, LAYERS)


def test_the_reduction_comes_from_the_hf_config():
    text = SimpleNamespace(num_hidden_layers=LAYERS)
    spec = {"name": "merge_half", "method": "aim", "merge_ratio": 0.5, "prune": None}
    plan = plan_from_hf_config(SimpleNamespace(text_config=text, aim_reduction=spec), "aim_reduction")
    assert plan.frame_tokens_after_merging(196) == 98
    with pytest.raises(UnsupportedReductionError, match='add "aim_reduction"'):
        plan_from_hf_config(SimpleNamespace(text_config=text), "aim_reduction")
    with pytest.raises(UnsupportedReductionError, match="'aim_default'"):
        plan_from_hf_config(SimpleNamespace(text_config=text, aim_reduction="aim_default"), "aim_reduction")


# Per-frame token counts of vLLM's LLaVA-OneVision checkpoints and of other grids (a 27x27
# so400m grid pooled 2x2 gives 196; 26x26 gives 169; 24x24 gives 144).
FRAME_TOKEN_COUNTS = (196, 169, 144, 64)
CUSTOM_SPECS = [
    {"name": "steps_150", "method": "aim", "merge_steps": [150], "prune": None},
    {"name": "steps_10_100", "method": "aim", "merge_steps": [10, 100], "prune": None},
    {"name": "steps_98_49_40_30", "method": "aim", "merge_steps": [98, 49, 40, 30], "prune": None},
    {"name": "ratio_375", "method": "aim", "merge_ratio": 0.375, "prune": None},
    {"name": "spatial_size", "method": "aim", "merge_ratio": 0.1, "merge_order": "spatial",
     "merge_weighting": "size", "prune": None},
    {"name": "random_30", "method": "random", "keep_ratio": 0.3, "seed": 4},
    {"name": "pool_20", "method": "pool", "keep_ratio": 0.2},
]


@pytest.mark.parametrize("tokens", FRAME_TOKEN_COUNTS)
@pytest.mark.parametrize("spec", supported_presets(LAYERS) + tuple(CUSTOM_SPECS),
                         ids=lambda spec: spec if isinstance(spec, str) else spec["name"])
def test_every_accepted_spec_produces_the_count_it_declares(spec, tokens):
    """vLLM places frames x K + 1 tokens from the declaration and fills them with what the model
    returns: the two must agree for every frame size, or frames are silently cut."""
    plan = frame_reduction_plan(spec, LAYERS)
    frames = torch.randn(3, tokens, 8, generator=torch.Generator().manual_seed(tokens))
    assert plan.reduce_video_frames(frames).shape[1] == plan.frame_tokens_after_merging(tokens)


@pytest.mark.parametrize(("steps", "kept"), [
    # each step merges min(r, T // 2) tokens (docs/algorithms.md §2): 196 -> 98
    ([150], 98),
    # 196 -> 186 -> 93
    ([10, 100], 93),
    # 196 -> 98 -> 49 -> 25 (min(40, 24)) -> 13 (min(30, 12))
    ([98, 49, 40, 30], 13),
])
def test_explicit_merge_steps_declare_what_the_capped_steps_leave(steps, kept):
    plan = frame_reduction_plan({"method": "aim", "merge_steps": steps, "prune": None}, LAYERS)
    assert plan.frame_tokens_after_merging(196) == kept


class DeclaresAQuarter(ReductionPlan):
    """Keeps half of each frame's tokens but declares a quarter."""

    name = "declares_a_quarter"

    def frame_tokens_after_merging(self, tokens_per_frame: int) -> int:
        return tokens_per_frame // 4

    def reduce_video_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return frames[:, : frames.shape[1] // 2]


class KeepsMoreOfBrightFrames(ReductionPlan):
    """Declares and keeps a quarter of blank frames, but half of others."""

    name = "keeps_more_of_bright_frames"

    def frame_tokens_after_merging(self, tokens_per_frame: int) -> int:
        return tokens_per_frame // 4

    def reduce_video_frames(self, frames: torch.Tensor) -> torch.Tensor:
        return frames[:, : frames.shape[1] // (2 if frames.any() else 4)]


def test_a_plan_producing_another_count_than_it_declares_is_refused_by_name():
    with pytest.raises(UnsupportedReductionError, match="'declares_a_quarter' leaves 98 of a frame's 196 tokens "
                                                        "but declares 49"):
        frame_tokens(DeclaresAQuarter(), 196)


def test_each_video_must_get_the_count_vllm_made_room_for():
    """The forward's check: a count that differs on real frames is an error naming the plan,
    never frames cut to the room vLLM made."""
    frames = torch.randn(3, 196, 8, generator=torch.Generator().manual_seed(1))
    plan = frame_reduction_plan("aim_merge_only", LAYERS)
    assert torch.equal(reduce_frames(plan, frames), plan.reduce_video_frames(frames).flatten(0, 1))
    lying = KeepsMoreOfBrightFrames()
    assert frame_tokens(lying, 196) == 49
    with pytest.raises(UnsupportedReductionError, match="'keeps_more_of_bright_frames' left 98 tokens of a "
                                                        "196-token frame where vLLM's prompt holds 49"):
        reduce_frames(lying, frames)


def test_a_request_may_name_a_shipped_preset_keeping_at_most_the_deployments_tokens():
    deployment = frame_reduction_plan({"name": "steps_10_100", "method": "aim", "merge_steps": [10, 100],
                                       "prune": None}, LAYERS)  # 93 tokens a frame
    assert request_preset_index(None, deployment, LAYERS, 196) == -1
    assert preset_of_index(-1, deployment, LAYERS) is deployment
    for name in ("pool_12", "random_25", "aim_merge_only"):
        plan = preset_of_index(request_preset_index(name, deployment, LAYERS, 196), deployment, LAYERS)
        assert plan.name == name
    with pytest.raises(UnsupportedReductionError, match="'aim_default' .* acts inside the LLM"):
        request_preset_index("aim_default", deployment, LAYERS, 196)
    with pytest.raises(UnsupportedReductionError, match="'baseline' keeps 196 tokens a frame, more than this "
                                                        "deployment's 'steps_10_100' \\(93\\)"):
        request_preset_index("baseline", deployment, LAYERS, 196)
    for value in ("configs/pool_12.yaml", {"method": "pool"}, 3):
        with pytest.raises(UnsupportedReductionError, match="must be a preset name"):
            request_preset_index(value, deployment, LAYERS, 196)
