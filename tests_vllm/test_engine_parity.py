"""The issue's first three checks: vLLM with the plugin, against aim-llava's own engine on the same
checkpoint, frames and prompt (float32).

1. the prompt gets frames x K + 1 video placeholders (K: the preset's tokens per frame);
2. the video embeddings vLLM builds equal our engine's reduced features (<= 1e-5);
3. greedy tokens through LLM.generate equal our engine's for the same preset, and vLLM without the
   plugin equals our baseline, where the top-2 margins make greedy decoding stable.
"""

import json

import pytest
import torch
from conftest import FRAME_COUNTS, MAX_TOKENS, QUESTION

from aim_llava.conversation import build_prompt
from aim_llava.mm_utils import tokenizer_image_token
from aim_llava.video import VideoClip

# Tokens per frame after each preset, from the docs: 196 pooled tokens (docs/algorithms.md §1),
# merged 196 -> 98 -> 49 (§2), pooled to a 5x5 grid (configs/pool_12.yaml).
TOKENS_PER_FRAME = {"baseline": 196, "aim_merge_only": 49, "pool_12": 25}
RUNS = {"baseline": "vllm_stock", "aim_merge_only": "vllm_merged", "pool_12": "vllm_pooled"}
# Both engines compute in float32; their logits differ by far less than this, so a greedy choice
# whose top-2 margin is larger cannot flip between them.
MIN_MARGIN = 1e-3


def video_token_id(checkpoint) -> int:
    return json.loads((checkpoint / "config.json").read_text())["video_token_index"]


def clip_of(path) -> VideoClip:
    import numpy as np

    frames = np.load(path)
    count = frames.shape[0]
    return VideoClip(frames, list(range(count)), [float(i) for i in range(count)], float(count), 1.0, str(path))


@pytest.mark.parametrize("preset", sorted(RUNS))
def test_prompt_gets_frames_times_k_plus_one_placeholders(preset, request, checkpoint):
    results = request.getfixturevalue(RUNS[preset])
    video = video_token_id(checkpoint)
    for frames, result in zip(FRAME_COUNTS, results):
        assert result["prompt_token_ids"].count(video) == frames * TOKENS_PER_FRAME[preset] + 1


@pytest.mark.parametrize("preset", sorted(RUNS))
def test_video_embeddings_equal_our_engines_features(preset, request, our_engine, videos):
    results = request.getfixturevalue(RUNS[preset])
    for path, result in zip(videos, results):
        ours = our_engine.encode(clip_of(path), reduction=preset).features
        (theirs,) = result["embeddings"]
        theirs = theirs.reshape(-1, theirs.shape[-1])
        assert theirs.dtype == ours.dtype == torch.float32
        assert theirs.shape == ours.shape
        assert (theirs - ours).abs().max().item() <= 1e-5


def our_greedy(engine, path, preset: str) -> tuple[list[int], list[int], list[float]]:
    """Our engine's prompt ids (-200 marks the video), greedy tokens (EOS not stopping, as vLLM's
    ignore_eos) and the top-2 logit margin of each choice (the prompt and the tokens re-run)."""
    plan = engine.plan(engine.resolve(preset))
    features = [engine.encode(clip_of(path), reduction=preset).features]
    ids = tokenizer_image_token(build_prompt(QUESTION), engine.tokenizer)
    tokens = engine.model.generate(torch.tensor([ids]), visual_features=features, max_new_tokens=MAX_TOKENS,
                                   eos_token_id=[], reduction=plan)[0].tolist()
    logits = engine.model(torch.tensor([ids + tokens[:-1]]), visual_features=features, reduction=plan).logits
    top = logits[0, -len(tokens):].topk(2, dim=-1)
    assert top.indices[:, 0].tolist() == tokens
    return ids, tokens, (top.values[:, 0] - top.values[:, 1]).tolist()


@pytest.mark.parametrize("preset", ["baseline", "aim_merge_only"])
def test_greedy_tokens_equal_our_engines(preset, request, our_engine, videos, checkpoint):
    results = request.getfixturevalue(RUNS[preset])
    video = video_token_id(checkpoint)
    for path, result in zip(videos, results):
        ids, tokens, margins = our_greedy(our_engine, path, preset)
        assert min(margins) > MIN_MARGIN, f"greedy is not stable on this checkpoint and prompt: margins {margins}"
        their_text_ids = [t for t in result["prompt_token_ids"] if t != video]
        assert their_text_ids == [t for t in ids if t != -200]
        assert result["token_ids"] == tokens
        their_margins = [first - second for first, second in result["top2_logprobs"]]
        assert their_margins == pytest.approx(margins, abs=MIN_MARGIN / 10)


def test_the_reduction_changes_what_the_model_sees_and_says(vllm_stock, vllm_merged):
    """The runs compared above differ: merging is not a no-op on this checkpoint."""
    assert [r["token_ids"] for r in vllm_stock] != [r["token_ids"] for r in vllm_merged]
