"""What vLLM batches: several requests with videos of different frame counts in one generate call,
two videos in one prompt, an image beside a video, a custom merge_steps mapping, random dropping
and bfloat16. Each video must be reduced on its own, as aim-llava's engine does, whatever vLLM
encodes with it, and must get exactly the tokens its prompt has room for.

Tokens per frame (of 196 pooled ones, docs/algorithms.md §1): random_25 keeps 49; merge_steps
[10, 100] merges min(r, T // 2) per step (§2): 196 -> 186 -> 93; aim_merge_only 196 -> 98 -> 49.
"""

import pytest
import torch
from conftest import (
    BATCH_FRAMES,
    CUSTOM,
    CUSTOM_CALLS,
    IMAGE_CALL,
    aim_overrides,
    assert_each_was_encoded,
    assert_greedy_equals_ours,
    call_results,
    clip_of,
    encoded,
    image_clip_of,
    request,
    video_placeholders,
    vllm_results,
)

PER_FRAME = {"random_25": 49, "merge_10_100": 93, "aim_merge_only": 49}
TWO_VIDEOS = {"image": 0, "video": 2}


# call: the requests of one LLM.generate
RANDOM_CALLS = [
    [(0,), (1,)],          # two 4-frame videos in one batch
    [(2,), (3, 4)],        # 3 frames, and a prompt with videos of 2 and 5 frames
    [(1,)],                # the second 4-frame video alone
    [(4,)],                # the 5-frame video alone
]


@pytest.fixture(scope="module")
def vllm_random(tmp_path_factory, checkpoint, batch_videos) -> dict:
    calls = [[request([batch_videos[i] for i in videos]) for videos in call] for call in RANDOM_CALLS]
    return vllm_results(tmp_path_factory.mktemp("random"), checkpoint, aim_overrides("random_25"), calls,
                        limit_mm_per_prompt=TWO_VIDEOS)


def test_vllm_encodes_the_videos_of_a_call_together(vllm_random):
    """The scenario of the tests below happens: vLLM's encoder sees several videos at once."""
    assert [len(encoded(vllm_random, "video", call)) for call in range(4)] == [2, 3, 1, 1]
    together = [len(batch["embeddings"]) for batch in vllm_random["encoder"] if batch["call"] < 2]
    assert max(together) >= 2


def test_random_dropping_keeps_per_video_tokens_whatever_is_batched(vllm_random, our_engine, batch_videos,
                                                                   checkpoint):
    """Each video, alone or beside others, gets our engine's random_25 tokens for that video alone
    (its own seeded choice per frame), and its prompt has room for exactly those."""
    for call, requests in enumerate(RANDOM_CALLS):
        for videos, result in zip(requests, call_results(vllm_random, call)):
            frames = sum(BATCH_FRAMES[i] for i in videos)
            assert video_placeholders(result, checkpoint) == frames * PER_FRAME["random_25"] + len(videos)
        expected = [our_engine.encode(clip_of(batch_videos[i]), reduction="random_25").features
                    for videos in requests for i in videos]
        assert_each_was_encoded(expected, encoded(vllm_random, "video", call), atol=1e-5)


def test_a_video_alone_and_beside_others_gets_the_same_embedding(vllm_random):
    """Bit for bit: the vision tower's rows do not depend on the batch, and each video is reduced
    alone."""
    beside = encoded(vllm_random, "video", 0) + encoded(vllm_random, "video", 1)
    for call in (2, 3):
        (alone,) = encoded(vllm_random, "video", call)
        assert any(torch.equal(alone, other) for other in beside)


def test_a_merge_steps_mapping_gets_the_tokens_its_steps_leave(vllm_custom, our_engine, batch_videos, checkpoint):
    for call, requests in enumerate(CUSTOM_CALLS):
        for videos, result in zip(requests, call_results(vllm_custom, call)):
            frames = sum(BATCH_FRAMES[i] for i in videos)
            assert video_placeholders(result, checkpoint) == frames * PER_FRAME["merge_10_100"] + len(videos)
            items = [clip_of(batch_videos[i]) for i in videos]
            assert_greedy_equals_ours(result, our_engine, items, [CUSTOM] * len(videos), checkpoint)


def test_an_image_beside_a_video_is_not_reduced(vllm_custom, our_engine, batch_videos, image, checkpoint):
    (result,) = call_results(vllm_custom, IMAGE_CALL)
    items = [image_clip_of(image), clip_of(batch_videos[3])]
    ours = [our_engine.encode(item, reduction=CUSTOM).features for item in items]
    assert ours[0].shape == our_engine.encode(items[0], reduction="baseline").features.shape
    assert video_placeholders(result, checkpoint) == len(ours[1])
    assert_each_was_encoded(ours[:1], encoded(vllm_custom, "image", IMAGE_CALL), atol=1e-5)
    assert_each_was_encoded(ours[1:], encoded(vllm_custom, "video", IMAGE_CALL), atol=1e-5)
    assert_greedy_equals_ours(result, our_engine, items, [CUSTOM, CUSTOM], checkpoint)


BFLOAT16_VIDEOS = (0, 2, 3)


@pytest.fixture(scope="module")
def vllm_bfloat16(tmp_path_factory, checkpoint, batch_videos) -> dict:
    """aim_merge_only in bfloat16, three videos of different frame counts in one call."""
    calls = [[request([batch_videos[i]]) for i in BFLOAT16_VIDEOS]]
    return vllm_results(tmp_path_factory.mktemp("bf16"), checkpoint, aim_overrides("aim_merge_only"), calls,
                        dtype="bfloat16")


def test_bfloat16_merges_each_video_as_our_engine(vllm_bfloat16, our_engine, batch_videos, checkpoint):
    """In bfloat16, each video's embedding is exactly our merge of the frames vLLM pooled, and as
    close to the float32 result as our engine's own bfloat16 run is (on random frames, bfloat16
    rounding flips some near-tied merge choices: both land 7-10% from float32, against 0.7% for
    the pooled frames)."""
    from aim_llava.pipeline import VideoLLM

    ours = VideoLLM.from_pretrained(checkpoint, device="cpu", dtype="bfloat16")
    plan = ours.plan(ours.resolve("aim_merge_only"))
    (batch,) = [b for b in vllm_bfloat16["encoder"] if b["modality"] == "video"]
    (pooled,) = batch["pooled"]
    frames = [BATCH_FRAMES[i] for i in BFLOAT16_VIDEOS]
    assert pooled.dtype == torch.bfloat16 and pooled.shape[0] == sum(frames)
    merged = [torch.cat([plan.reduce_video_frames(part).flatten(0, 1), ours.model.model.image_newline[None]])
              for part in pooled.split(frames)]
    assert_each_was_encoded(merged, batch["embeddings"], atol=0.0)
    for i in BFLOAT16_VIDEOS:
        exact = our_engine.encode(clip_of(batch_videos[i]), reduction="aim_merge_only").features
        ours_bf16 = ours.encode(clip_of(batch_videos[i]), reduction="aim_merge_only").features
        theirs = next(e for e in batch["embeddings"] if e.shape == exact.shape)
        assert theirs.dtype == ours_bf16.dtype == torch.bfloat16
        error, our_error = [(x.float() - exact).norm() / exact.norm() for x in (theirs, ours_bf16)]
        assert error <= 1.5 * our_error + 0.01, (error, our_error)
