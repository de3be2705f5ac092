"""The issue's first three checks: vLLM with the plugin, against aim-llava's own engine on the same
checkpoint, frames and prompt (float32).

1. the prompt gets frames x K + 1 video placeholders (K: the preset's tokens per frame; pool_12 is
   asked for by each request, on the engine started with aim_merge_only);
2. the video embeddings vLLM builds equal our engine's reduced features (<= 1e-5);
3. greedy tokens through LLM.generate equal our engine's for the same preset, and vLLM without the
   plugin equals our baseline, where the top-2 margins make greedy decoding stable.
"""


import pytest
import torch
from conftest import FRAME_COUNTS, assert_greedy_equals_ours, clip_of, encoded, video_placeholders

# Tokens per frame after each preset, from the docs: 196 pooled tokens (docs/algorithms.md §1),
# merged 196 -> 98 -> 49 (§2), pooled to a 5x5 grid (configs/pool_12.yaml).
TOKENS_PER_FRAME = {"baseline": 196, "aim_merge_only": 49, "pool_12": 25}
# preset -> the run and its first call (one call per video from there)
RUNS = {"baseline": ("vllm_stock", 0), "aim_merge_only": ("vllm_merged", 0),
        "pool_12": ("vllm_merged", len(FRAME_COUNTS))}


def calls_of(request, preset: str) -> list[tuple[dict, int]]:
    """(the request's result, its call) per video of ``videos`` for ``preset``."""
    fixture, first = RUNS[preset]
    run = request.getfixturevalue(fixture)
    return [(result, first + i) for i, (result,) in enumerate(run["calls"][first:first + len(FRAME_COUNTS)])]


@pytest.mark.parametrize("preset", sorted(RUNS))
def test_prompt_gets_frames_times_k_plus_one_placeholders(preset, request, checkpoint):
    for frames, (result, _) in zip(FRAME_COUNTS, calls_of(request, preset)):
        assert video_placeholders(result, checkpoint) == frames * TOKENS_PER_FRAME[preset] + 1


@pytest.mark.parametrize("preset", sorted(RUNS))
def test_video_embeddings_equal_our_engines_features(preset, request, our_engine, videos):
    run = request.getfixturevalue(RUNS[preset][0])
    for path, (_, call) in zip(videos, calls_of(request, preset)):
        ours = our_engine.encode(clip_of(path), reduction=preset).features
        (theirs,) = encoded(run, "video", call)
        assert theirs.dtype == ours.dtype == torch.float32
        assert theirs.shape == ours.shape
        assert (theirs - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("preset", ["baseline", "aim_merge_only"])
def test_greedy_tokens_equal_our_engines(preset, request, our_engine, videos, checkpoint):
    for path, (result, _) in zip(videos, calls_of(request, preset)):
        assert_greedy_equals_ours(result, our_engine, [clip_of(path)], [preset], checkpoint)


def test_the_reduction_changes_what_the_model_sees_and_says(vllm_stock, vllm_merged):
    """The runs compared above differ: merging is not a no-op on this checkpoint."""
    merged = vllm_merged["calls"][:len(FRAME_COUNTS)]
    assert [r["token_ids"] for (r,) in vllm_stock["calls"]] != [r["token_ids"] for (r,) in merged]
