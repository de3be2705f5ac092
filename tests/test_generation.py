"""Decoding with the KV cache, batches with padding, and attention backends."""

import pytest
import torch
from conftest import left_padded_batch, prompt_ids, random_frames

from aim_llava import load_pretrained_model


@pytest.fixture(scope="module")
def video_inputs(loaded):
    tokenizer, _, processor, _ = loaded
    video = processor.preprocess(random_frames(6, seed=11))["pixel_values"]
    return prompt_ids(tokenizer, "Describe the video in detail."), video


def test_cached_generation_equals_recomputation(loaded, video_inputs):
    _, model, _, _ = loaded
    ids, video = video_inputs
    kwargs = dict(images=[video], modalities=["video"], max_new_tokens=20, eos_token_id=[])
    cached = model.generate(ids, use_cache=True, **kwargs)
    recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (1, 20)
    assert torch.equal(cached, recomputed)


def test_batch_with_different_video_lengths_equals_single_runs(loaded):
    tokenizer, model, processor, _ = loaded
    videos = [processor.preprocess(random_frames(n, seed=n))["pixel_values"] for n in (2, 5)]
    prompts = [prompt_ids(tokenizer, "What is shown?"), prompt_ids(tokenizer, "Describe every person you see.")]
    ids, mask = left_padded_batch(prompts, model.generation_defaults.pad_token_id)
    kwargs = dict(modalities=["video", "video"], max_new_tokens=12, eos_token_id=[])
    batched = model.generate(ids, attention_mask=mask, images=videos, **kwargs)
    with torch.no_grad():
        batch_out = model(ids, attention_mask=mask, images=videos, modalities=["video", "video"])
    for i in range(2):
        single = model.generate(prompts[i], images=[videos[i]], modalities=["video"], max_new_tokens=12, eos_token_id=[])
        assert torch.equal(batched[i], single[0])
        with torch.no_grad():
            single_logits = model(prompts[i], images=[videos[i]], modalities=["video"]).logits[0]
        valid = batch_out.inputs.valid[i]
        assert (batch_out.logits[i][valid] - single_logits).abs().max() <= 1e-4


def test_generation_stops_at_eos_and_pads(loaded, video_inputs):
    _, model, _, _ = loaded
    ids, video = video_inputs
    free = model.generate(ids, images=[video], modalities=["video"], max_new_tokens=8, eos_token_id=[])
    stop_token = int(free[0, 2])
    stopped = model.generate(ids, images=[video], modalities=["video"], max_new_tokens=8, eos_token_id=stop_token)
    first = free[0].tolist().index(stop_token)
    assert stopped[0].tolist() == free[0, : first + 1].tolist()


def test_streamer_sees_every_token(loaded, video_inputs):
    _, model, _, _ = loaded
    ids, video = video_inputs

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    recorder = Recorder()
    out = model.generate(ids, images=[video], modalities=["video"], max_new_tokens=5, eos_token_id=[], streamer=recorder)
    assert recorder.puts[0] == [[]]  # the prompt, as transformers' streamers expect
    assert [p[0] for p in recorder.puts[1:]] == out[0].tolist()
    assert recorder.ended


def test_eager_and_sdpa_agree(tiny_qwen_dir, loaded, video_inputs):
    tokenizer, sdpa_model, _, _ = loaded
    _, eager_model, _, _ = load_pretrained_model(
        tiny_qwen_dir, device_map="cpu", torch_dtype="float32", attn_implementation="eager"
    )
    ids, video = video_inputs
    short = prompt_ids(tokenizer, "Hi.")
    batch_ids, mask = left_padded_batch([ids, short], sdpa_model.generation_defaults.pad_token_id)
    images = [video, video[:2]]
    with torch.no_grad():
        for args in ((ids, None, [video]), (batch_ids, mask, images)):
            a = sdpa_model(args[0], attention_mask=args[1], images=args[2], modalities=["video"] * len(args[2]))
            b = eager_model(args[0], attention_mask=args[1], images=args[2], modalities=["video"] * len(args[2]))
            valid = a.inputs.valid
            assert (a.logits[valid] - b.logits[valid]).abs().max() <= 1e-4


def test_flash_attention_request_without_flash_attn_falls_back(tiny_qwen_dir, caplog):
    from aim_llava.model.attention import flash_attn_available

    if flash_attn_available():
        pytest.skip("flash-attn is installed here; the fallback path is not reachable")
    _, model, _, _ = load_pretrained_model(tiny_qwen_dir, device_map="cpu", attn_implementation="flash_attention_2")
    assert model.model.attn_implementation == "sdpa"
    assert "flash_attn is not installed" in caplog.text


def test_two_threads_with_different_reductions_equal_running_alone(loaded):
    """The model holds no per-call state: concurrent calls with different plans do not mix."""
    import threading

    from conftest import plan

    tokenizer, model, processor, _ = loaded
    jobs = {
        "aim_default": (prompt_ids(tokenizer, "Describe the video."), random_frames(5, 64, 80, seed=31)),
        "fastv_default": (prompt_ids(tokenizer, "What moves?"), random_frames(3, 64, 80, seed=32)),
        "baseline": (prompt_ids(tokenizer, "Who is there?"), random_frames(4, 64, 80, seed=33)),
    }

    def run(name):
        ids, frames = jobs[name]
        video = processor.preprocess(frames)["pixel_values"]
        out = model.generate(ids, images=[video], modalities=["video"], max_new_tokens=10, eos_token_id=[],
                             reduction=plan(model, name), return_dict_in_generate=True)
        return out.sequences, out.reduction.visual_tokens_per_layer

    alone = {name: run(name) for name in jobs}
    results, errors = {}, []
    barrier = threading.Barrier(len(jobs))

    def worker(name):
        try:
            barrier.wait()
            for round_ in range(2):
                results[(name, round_)] = run(name)
        except Exception as err:  # reported below, with the thread's name
            errors.append((name, err))

    threads = [threading.Thread(target=worker, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for (name, _), (tokens, counts) in results.items():
        assert torch.equal(tokens, alone[name][0]), name
        assert counts == alone[name][1], name
    assert alone["aim_default"][1][-1] != alone["baseline"][1][-1]  # the plans really differ
