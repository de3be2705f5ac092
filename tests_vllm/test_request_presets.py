"""A preset per request: ``mm_processor_kwargs={"aim_reduction": NAME}`` on a request reduces its
videos with that shipped preset instead of the deployment's (hf_overrides), placeholders and
embeddings alike, beside requests with other presets in the same batch; what the deployment
cannot serve is refused by name.

Tokens per frame (docs/algorithms.md): deployment merge_steps [10, 100] 93; pool_12 25 (5x5);
random_25 and aim_merge_only 49.
"""

from conftest import (
    BATCH_FRAMES,
    CUSTOM,
    IMAGE_CALL,
    REFUSED_REQUEST_PRESETS,
    REQUEST_PRESET_CALLS,
    assert_each_was_encoded,
    assert_greedy_equals_ours,
    call_results,
    clip_of,
    encoded,
    video_placeholders,
)

PER_FRAME = {"pool_12": 25, "random_25": 49, "aim_merge_only": 49, None: 93}
FIRST = IMAGE_CALL + 1  # vllm_custom's first call of REQUEST_PRESET_CALLS


def test_each_request_gets_its_presets_tokens(vllm_custom, our_engine, batch_videos, checkpoint):
    for offset, requests in enumerate(REQUEST_PRESET_CALLS):
        for (clip, preset), result in zip(requests, call_results(vllm_custom, FIRST + offset)):
            assert video_placeholders(result, checkpoint) == BATCH_FRAMES[clip] * PER_FRAME[preset] + 1
            assert_greedy_equals_ours(result, our_engine, [clip_of(batch_videos[clip])], [preset or CUSTOM], checkpoint)
        expected = [our_engine.encode(clip_of(batch_videos[clip]), reduction=preset or CUSTOM).features
                    for clip, preset in requests]
        assert_each_was_encoded(expected, encoded(vllm_custom, "video", FIRST + offset), atol=1e-5)


def test_request_presets_the_deployment_cannot_serve_are_refused_by_name(vllm_custom):
    refusals = vllm_custom["calls"][FIRST + len(REQUEST_PRESET_CALLS):]
    messages = [call.get("error", "") if isinstance(call, dict) else "" for call in refusals]
    inside, larger, path = messages
    assert "reduction 'aim_default' (method 'aim') acts inside the LLM" in inside
    assert "'baseline'" in larger and "196 tokens a frame" in larger and "93" in larger
    assert REFUSED_REQUEST_PRESETS[2] in path and "preset name" in path
