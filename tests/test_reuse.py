"""The reuse cache (issue 26): encoded visuals and video KV prefixes shared across questions.

Every reuse is checked against the same work done without the cache: a changed file, preset,
sampling, preprocessing or dtype must give what a fresh encoding gives (never a stale hit), and a
reused prefix the logits of a full prefill, step by step.
"""

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import left_padded_batch, plan, random_frames
from fake_cuda import FakeCuda
from PIL import Image
from sync_points import count_sync_points
from test_decoding import graphed_runner

from aim_llava import load_pretrained_model
from aim_llava.cli import main
from aim_llava.constants import IMAGE_TOKEN_INDEX
from aim_llava.conversation import get_conversation
from aim_llava.mm_utils import tokenizer_image_token
from aim_llava.model.image_processor import SiglipImageProcessor
from aim_llava.model.language_model.generation import EAGER_STEPS_BEFORE_CAPTURE
from aim_llava.model.language_model.kv_cache import KVCache
from aim_llava.pipeline import EncodedVisual, Request, SamplingOptions, VideoLLM
from aim_llava.prefix_cache import PrefixPrefill
from aim_llava.reuse_cache import ReuseCache
from aim_llava.sample_media import write_sample_video
from aim_llava.server.batching import warm_up
from aim_llava.server.service import Service
from aim_llava.video import MediaLimits, VideoClip

DECODE_STEPS = 5
LOGIT_TOLERANCE = 1e-5
PRESETS = [
    "baseline", "aim_merge_only", "aim_default", "aim_prune_only", "fastv_default", "pool_25", "aim_default_mask",
    {"name": "aim_prune_only_mask", "method": "aim", "merge_ratio": None, "prune_mode": "mask"},
    {"name": "fastv_mask", "method": "fastv", "prune_mode": "mask"},
]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    return [write_sample_video(root / f"clip{i}.mp4", num_frames=20 + 9 * i, fps=10) for i in range(2)]


def llm_of(loaded, cache_mb: float = 64, **options) -> VideoLLM:
    tokenizer, model, processor, _ = loaded
    return VideoLLM(tokenizer, model, processor, sampling=SamplingOptions(num_frames=4), cache_mb=cache_mb, **options)


# ---------------------------------------------------------------------------- prefix KV reuse


def prompt(tokenizer, question: str, system: str = "You are a helpful assistant.") -> torch.Tensor:
    """[1, L] ids of a one-turn prompt with the video first and this system message."""
    conv = get_conversation("qwen_1_5")
    conv.system = system
    conv.append_message(conv.roles[0], f"<image>\n{question}")
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]


def prefix_ids(prompts: list[torch.Tensor], visual_keys: list, features: list[torch.Tensor]):
    before = [p[0].tolist()[: p[0].tolist().index(IMAGE_TOKEN_INDEX)] for p in prompts]
    return [(key, text) for key, text in zip(visual_keys, before)], [len(t) + f.shape[0] for t, f in zip(before, features)]


def decoded_logits(model, reduction, prompts, features, prefill=None) -> tuple[list[torch.Tensor], object]:
    """First-token logits and those of DECODE_STEPS greedy steps after a cached prefill (with the
    given prefill stand-in, or the model's own), and the reduction record."""
    ids, mask = left_padded_batch(prompts)
    inputs = model.prepare_multimodal_inputs(ids, mask, visual_features=features, reduction=reduction)
    kv = KVCache(len(model.model.layers), reserve=DECODE_STEPS + 1)
    hidden, _, record = (prefill or model.prefill)(inputs, kv, reduction)
    logits = [model.lm_head(hidden[:, -1]).float()]
    step = model.step_logits(kv, reduction.attn_implementation)
    positions = inputs.position_ids[:, -1] + 1
    for number in range(DECODE_STEPS):
        logits.append(step(logits[-1].argmax(dim=-1), positions, torch.tensor([number])))
        positions = positions + 1
    return logits, record


def assert_same_decoding(reference, reused) -> None:
    (expected, expected_record), (actual, actual_record) = reference, reused
    for want, got in zip(expected, actual, strict=True):
        assert torch.equal(want.argmax(dim=-1), got.argmax(dim=-1))
        torch.testing.assert_close(got, want, rtol=0, atol=LOGIT_TOLERANCE)
    assert actual_record.visual_tokens_per_layer == expected_record.visual_tokens_per_layer
    assert actual_record.kept.keys() == expected_record.kept.keys()
    for layer, kept in expected_record.kept.items():
        assert torch.equal(actual_record.kept[layer], kept)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p if isinstance(p, str) else p["name"])
def test_reused_prefix_decodes_like_a_full_prefill_in_a_padded_batch(loaded, preset):
    """Clip A's prefix is cached by a first question; then a padded batch asks A again (a hit),
    B (a miss, another prefix length) and A with a third question (a hit within the batch)."""
    tokenizer, model, _, _ = loaded
    reduction = plan(model, preset)
    generator = torch.Generator().manual_seed(0)
    clip_a, clip_b = (torch.randn(n, 64, generator=generator) * 0.5 for n in (40, 23))
    cache = ReuseCache(2**30)
    first = [prompt(tokenizer, "What is it?")]
    ids, lengths = prefix_ids(first, ["A"], [clip_a])
    assert_same_decoding(decoded_logits(model, reduction, first, [clip_a]),
                         decoded_logits(model, reduction, first, [clip_a], PrefixPrefill(model, cache, ids, lengths)))
    batch = [prompt(tokenizer, "Describe the whole clip in words."), prompt(tokenizer, "Why?"),
             prompt(tokenizer, "Which colour is the third bar from the left?")]
    features = [clip_a, clip_b, clip_a]
    ids, lengths = prefix_ids(batch, ["A", "B", "A"], features)
    reused = decoded_logits(model, reduction, batch, features, PrefixPrefill(model, cache, ids, lengths))
    assert_same_decoding(decoded_logits(model, reduction, batch, features), reused)
    stats = cache.stats()
    assert (stats["prefix_hits"], stats["prefix_misses"], stats["entries"]) == (2, 2, 2)


@pytest.mark.parametrize("preset", ["baseline", "aim_default"])
def test_reused_prefix_in_a_step_captured_once_and_replayed(loaded, preset, monkeypatch):
    """The CUDA-graph contract (tests/test_decoding.py: GraphedStep's capture, check and replay
    through tests/fake_cuda.py's CPU graph) with the prefix copied into the call's KV buffers: the
    replayed step decodes like eager decoding without reuse."""
    tokenizer, model, _, _ = loaded
    reduction = plan(model, preset)
    features = [torch.randn(n, 64, generator=torch.Generator().manual_seed(4)) * 0.5 for n in (26, 19)]
    prompts = [prompt(tokenizer, "What is it?"), prompt(tokenizer, "Describe the clip, please.")]
    ids, mask = left_padded_batch(prompts)
    options = dict(attention_mask=mask, visual_features=features, reduction=reduction, max_new_tokens=12,
                   eos_token_id=[])
    eager = model.generate(ids, **options)
    cache = ReuseCache(2**30)
    model.generate(ids, prefill=PrefixPrefill(model, cache, *prefix_ids(prompts, ["A", "B"], features)), **options)
    cuda = FakeCuda(monkeypatch)
    steps = graphed_runner(monkeypatch)
    hit = PrefixPrefill(model, cache, *prefix_ids(prompts, ["A", "B"], features))
    assert torch.equal(model.generate(ids, prefill=hit, **options), eager)
    # 11 steps after the prefill's token: 4 eager, 1 captured, 1 checked by a replay, 5 replayed
    assert steps[0].checked and cuda.graphs[0].replays == 12 - 1 - EAGER_STEPS_BEFORE_CAPTURE - 1
    assert cache.stats()["prefix_hits"] == 2


def test_prefix_prefill_reads_nothing_back_from_the_device(loaded):
    """Like the ordinary prefill (tests/test_sync_free.py, whose AIM uses a GPU's importance kernel:
    the CPU's reads values back), for a miss and a hit alike."""
    tokenizer, model, _, _ = loaded
    reduction = plan(model, {"method": "aim", "importance_kernel": "chunked"})
    features = [torch.randn(n, 64, generator=torch.Generator().manual_seed(3)) for n in (20, 31)]
    prompts = [prompt(tokenizer, "Why?"), prompt(tokenizer, "What is in the picture?")]
    ids, mask = left_padded_batch(prompts)
    inputs = model.prepare_multimodal_inputs(ids, mask, visual_features=features, reduction=reduction)
    cache = ReuseCache(2**30)
    for _ in range(2):
        prefill = PrefixPrefill(model, cache, *prefix_ids(prompts, ["A", "B"], features))
        with torch.no_grad(), count_sync_points() as found:
            prefill(inputs, KVCache(len(model.model.layers), reserve=4), reduction)
        assert [point for point in found if "aim_llava" in point.where] == []
    assert cache.stats()["prefix_hits"] == 2


def test_prefix_key_holds_the_text_before_the_video_and_the_reused_layers(loaded):
    """Another system message, or a preset that shares the visual but prunes (fewer reused
    layers), must not take the prefix of an earlier call."""
    tokenizer, model, _, _ = loaded
    features = [torch.randn(30, 64, generator=torch.Generator().manual_seed(1)) * 0.5]
    cache = ReuseCache(2**30)
    calls = [("aim_merge_only", "You are a helpful assistant."), ("aim_merge_only", "Answer tersely, please."),
             ("aim_default", "Answer tersely, please.")]
    for preset, system in calls:
        reduction = plan(model, preset)
        prompts = [prompt(tokenizer, "What happens?", system)]
        ids, lengths = prefix_ids(prompts, ["same visual"], features)
        assert_same_decoding(decoded_logits(model, reduction, prompts, features),
                             decoded_logits(model, reduction, prompts, features,
                                            PrefixPrefill(model, cache, ids, lengths)))
    assert cache.stats()["prefix_misses"] == 3


@pytest.mark.parametrize("preset", ["baseline", "aim_default"])
def test_answers_with_both_reuses_equal_answers_without_cache(loaded, videos, preset):
    """Through VideoLLM.run, padded batches of 2: questions on clips already seen and new ones."""
    requests = [Request(videos[0], [("What is shown?", None)]), Request(videos[0], [("Describe it all.", None)]),
                Request(videos[1], [("Why?", None)]), Request(videos[0], [("How many bars are white?", None)]),
                Request(videos[1], [("Is it bright or dark in the clip?", None)])]
    cached = llm_of(loaded)

    def answers(llm):
        return [(r.response.text, r.response.num_new_tokens, r.response.visual_tokens)
                for r in llm.run(requests, batch_size=2, reduction=preset, max_new_tokens=6)]

    assert answers(cached) == answers(llm_of(loaded, cache_mb=0))
    stats = cached.cache.stats()
    assert [stats[f"{kind}_{what}"] for kind in ("visual", "prefix") for what in ("hits", "misses")] == [3, 2, 3, 2]


def test_chat_follow_ups_reuse_the_prefix(loaded, videos):
    llm = llm_of(loaded)
    session = llm.chat(videos[0])
    answers = [session.ask(question, max_new_tokens=4) for question in ("What is it?", "And then?")]
    plain = llm_of(loaded, cache_mb=0).chat(videos[0])
    assert answers == [plain.ask(question, max_new_tokens=4) for question in ("What is it?", "And then?")]
    assert llm.cache.stats()["prefix_hits"] == 1


@pytest.mark.parametrize("preset, layers_kept", [("baseline", 6), ("aim_default", 3)])
def test_bytes_per_cached_clip_follow_the_documented_formula(loaded, videos, preset, layers_kept):
    """README: tokens x hidden x bytes for the video; (tokens + text before) x layers kept x 2 x
    KV heads x head dim x bytes for its prefix, plus the hidden states when layers remain."""
    llm = llm_of(loaded)
    visual = llm.encode(videos[0], reduction=preset)
    llm.respond(visual, [("What is it?", None)], max_new_tokens=2)
    text = llm.model.config.text  # float32: 4 bytes a value; 6 layers, 2 KV heads of 16, hidden 64
    ids = tokenizer_image_token(llm.prompt(visual, [("What is it?", None)]), llm.tokenizer)
    prefix = ids.index(IMAGE_TOKEN_INDEX) + visual.num_tokens
    hidden = prefix * 64 * 4 if layers_kept < 6 else 0
    assert (text.hidden_size, text.num_key_value_heads, text.head_dim) == (64, 2, 16)
    assert llm.cache.stats()["bytes"] == visual.num_tokens * 64 * 4 + prefix * layers_kept * 2 * 2 * 16 * 4 + hidden


def server_replies(loaded, media_root, clip, questions, cache_mb: float) -> tuple[list[str], dict | None, int]:
    """The replies of an in-process server (its request path: parsing, media read through an
    O_PATH handle under the server's limits, the model thread) to one question after another about
    ``clip``, its cache's counts and how many times it decoded the file."""
    llm = llm_of(loaded, cache_mb=cache_mb)
    decoded, load = [], llm.load
    llm.load = lambda *args, **kwargs: decoded.append(args[0]) or load(*args, **kwargs)
    service = Service(llm, media_root, "tiny")
    replies = []
    try:
        for question in questions:
            body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip.name}},
                                                              {"type": "text", "text": question}]}],
                    "max_tokens": 4}
            replies.append(asyncio.run(service.complete(json.dumps(body).encode()))["choices"][0]["message"]["content"])
    finally:
        service.close()
    return replies, llm.cache.stats() if llm.cache is not None else None, len(decoded)


def test_a_second_request_on_a_clip_through_the_server_is_a_hit_with_the_same_reply(loaded, videos, caplog):
    """Nor is the file decoded again: the server recognises it by its identity."""
    questions = ("What is it?", "Which colour are the bars?")
    with caplog.at_level(logging.INFO, logger="aim_llava.cache"):
        replies, stats, decoded = server_replies(loaded, videos[0].parent, videos[0], questions, cache_mb=64)
    plain, _, decoded_without = server_replies(loaded, videos[0].parent, videos[0], questions, cache_mb=0)
    assert replies == plain and (decoded, decoded_without) == (1, 2)
    assert [stats[f"{kind}_{what}"] for kind in ("visual", "prefix") for what in ("hits", "misses")] == [1, 1, 1, 1]
    assert "reuse cache so far: visual 1 hit / 1 miss; prefix 1 hit / 1 miss" in caplog.text


def test_frames_read_under_the_servers_limits_are_not_those_of_the_full_size_frames(loaded, videos):
    """The server's frames are resized as they are decoded: an eval-style read of the same file
    must not take their entry, nor they its."""
    llm = llm_of(loaded)
    limits = MediaLimits(llm.image_processor.image_size, 10**9, 10**9)
    llm.encode_clips([llm.read(videos[1], limits=limits, backend="pyav")], llm.reduction)
    assert_fresh(llm.encode(videos[1], backend="pyav"), llm_of(loaded, cache_mb=0).encode(videos[1], backend="pyav"))
    again = llm.read(videos[1], limits=dataclasses.replace(limits, deadline=time.monotonic() + 60), backend="pyav")
    assert isinstance(again, EncodedVisual)  # the deadline is not part of the key


def test_the_server_warm_up_leaves_the_cache_empty(loaded):
    llm = llm_of(loaded)
    warm_up(llm, 2)
    assert llm.cache.stats()["entries"] == 0


def test_eval_reports_the_cache_and_cache_mb_0_turns_it_off(tiny_qwen_dir, videos, tmp_path, capsys):
    items = [(videos[0], "What is shown?"), (videos[0], "Which colour?"), (videos[1], "What is shown?")]
    (tmp_path / "data.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "video": str(video), "question": question, "options": ["a", "b"], "answer": "A"})
        + "\n" for i, (video, question) in enumerate(items)))

    def evaluate(out, *extra):
        assert main(["eval", "--data", str(tmp_path / "data.jsonl"), "--model", str(tiny_qwen_dir), "--frames", "3",
                     "--max-new-tokens", "3", "--output", str(tmp_path / out), *extra]) == 0
        table = capsys.readouterr().out
        summary = json.loads((tmp_path / out / "summary.json").read_text())[0]
        records = [json.loads(line) for line in (tmp_path / out / "baseline.jsonl").read_text().splitlines()]
        return table, summary["cache"], records

    table, counts, records = evaluate("cached")
    assert [counts[f"{kind}_{what}"] for kind in ("visual", "prefix") for what in ("hits", "misses")] == [1, 2, 1, 2]
    assert "| 1:2 / 1:2 |" in table and [r["visual_cached"] for r in records] == [False, True, False]
    table, counts, plain = evaluate("plain", "--cache-mb", "0")
    assert counts is None and "| off |" in table
    assert [r["text"] for r in plain] == [r["text"] for r in records]


# ---------------------------------------------------------------------------- visual cache keys


def encode_twice(llm: VideoLLM, source, first: dict, second: dict, change=lambda: None):
    """Encode ``source`` with the ``first`` options, apply ``change``, encode with the ``second``:
    that second visual and what an uncached model encodes at that point."""
    llm.encode(source, **first)
    change()
    fresh = VideoLLM(llm.tokenizer, llm.model, llm.image_processor, sampling=llm.sampling, cache_mb=0)
    return llm.encode(source, **second), fresh.encode(source, **second)


def assert_fresh(visual, fresh) -> None:
    assert not visual.cached
    assert visual.features.shape == fresh.features.shape and torch.equal(visual.features, fresh.features)


def test_a_repeated_encoding_is_a_hit_and_equals_a_fresh_one(loaded, videos):
    llm = llm_of(loaded)
    visual, fresh = encode_twice(llm, videos[0], {}, {})
    assert visual.cached and torch.equal(visual.features, fresh.features)
    assert visual.clip.timestamps == fresh.clip.timestamps and visual.clip.frames.shape[0] == 0  # pixels not kept
    assert llm.cache.stats()["visual_hits"] == 1


def write_bmp(path, colour, width: int = 60) -> None:
    Image.new("RGB", (width, 40), colour).save(path, format="BMP")  # uncompressed: the size follows the width


@pytest.mark.parametrize("changed", ["mtime", "size", "inode"])
def test_a_changed_file_is_a_miss(loaded, tmp_path, changed):
    """Each change leaves every other field of the file's identity as it was."""
    path = tmp_path / "frame.bmp"
    write_bmp(path, (200, 10, 10))
    before = os.stat(path)

    def change():
        if changed == "mtime":
            write_bmp(path, (10, 200, 10))
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        elif changed == "size":
            write_bmp(path, (10, 200, 10), width=64)
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        else:
            write_bmp(tmp_path / "new.bmp", (10, 200, 10))
            os.utime(tmp_path / "new.bmp", ns=(before.st_atime_ns, before.st_mtime_ns))
            os.replace(tmp_path / "new.bmp", path)
        after = os.stat(path)
        assert [after.st_mtime_ns != before.st_mtime_ns, after.st_size != before.st_size,
                after.st_ino != before.st_ino] == [changed == name for name in ("mtime", "size", "inode")]

    assert_fresh(*encode_twice(llm_of(loaded), path, {}, {}, change))


def test_a_changed_frame_directory_is_a_miss(loaded, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for index in range(3):
        write_bmp(frames / f"{index}.bmp", (60 * index, 10, 10))
    before = os.stat(frames / "2.bmp")

    def change():
        shutil.copy(frames / "0.bmp", frames / "2.bmp")  # same size, same inode
        os.utime(frames / "2.bmp", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))

    assert_fresh(*encode_twice(llm_of(loaded), frames, {}, {}, change))


@pytest.mark.parametrize("sampling", [{"num_frames": 3}, {"start": 0.5}, {"end": 1.5}, {"fps": 2.0},
                                      {"max_frames": 2}])
def test_changed_sampling_is_a_miss(loaded, videos, sampling):
    assert_fresh(*encode_twice(llm_of(loaded), videos[1], {}, sampling))


@pytest.mark.parametrize("first, second", [("aim_merge_only", "pool_25"), ("baseline", "aim_merge_only"),
                                           ("aim_merge_only", {"name": "half", "method": "aim", "merge_ratio": 0.5})])
def test_a_preset_that_encodes_differently_is_a_miss(loaded, videos, first, second):
    assert_fresh(*encode_twice(llm_of(loaded), videos[0], {"reduction": first}, {"reduction": second}))


@pytest.mark.parametrize("first, second", [("aim_merge_only", "aim_default"), ("baseline", "fastv_default"),
                                           ("baseline", "aim_prune_only")])
def test_presets_that_merge_alike_share_the_encoding(loaded, videos, first, second):
    visual, fresh = encode_twice(llm_of(loaded), videos[0], {"reduction": first}, {"reduction": second})
    assert visual.cached and torch.equal(visual.features, fresh.features)
    assert visual.reduction.name == second


def test_changed_preprocessing_is_a_miss(loaded, videos):
    llm = llm_of(loaded)

    def change():
        llm.image_processor = SiglipImageProcessor(384, (0.4, 0.5, 0.6), (0.5, 0.5, 0.5))

    assert_fresh(*encode_twice(llm, videos[0], {}, {}, change))


def test_a_model_cast_to_another_dtype_is_a_miss(tiny_qwen_dir, videos):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_qwen_dir, device_map="cpu", torch_dtype="float32")
    llm = VideoLLM(tokenizer, model, processor, sampling=SamplingOptions(num_frames=4), cache_mb=64)
    assert_fresh(*encode_twice(llm, videos[0], {}, {}, lambda: model.to(torch.bfloat16)))


def test_changed_in_memory_frames_are_a_miss(loaded):
    frames = random_frames(3, 48, 64)
    clip = VideoClip(frames, [0, 1, 2], [0.0, 0.5, 1.0], 1.5, 2.0, "memory")
    changed = frames.copy()
    changed[1, 5, 5, 0] ^= 1
    llm = llm_of(loaded)
    llm.encode(clip)
    assert llm.encode(VideoClip(frames.copy(), [0, 1, 2], [0.0, 0.5, 1.0], 1.5, 2.0, "memory")).cached
    assert_fresh(llm.encode(VideoClip(changed, [0, 1, 2], [0.0, 0.5, 1.0], 1.5, 2.0, "memory")),
                 llm_of(loaded, cache_mb=0).encode(VideoClip(changed, [0, 1, 2], [0.0, 0.5, 1.0], 1.5, 2.0, "m")))


# ---------------------------------------------------------------------------- the store itself


def test_cache_is_bounded_in_bytes_least_recently_used_first():
    cache = ReuseCache(100)
    for name in "abc":
        assert cache.put(("visual", name), name, 40)
    assert cache.get(("visual", "a")) is None  # evicted for c
    assert cache.get(("visual", "b")) == "b"  # b is now the most recent
    assert cache.put(("prefix", "d"), "d", 40)  # evicts c, not b
    assert [cache.get(("visual", n)) for n in "bc"] == ["b", None] and cache.get(("prefix", "d")) == "d"
    assert not cache.put(("visual", "huge"), "x", 101) and cache.stats()["bytes"] == 80
    assert cache.stats() == {"visual_hits": 2, "visual_misses": 2, "prefix_hits": 1, "prefix_misses": 0,
                                   "entries": 2, "bytes": 80, "capacity_bytes": 100}


def test_no_cache_keeps_nothing(loaded, videos):
    llm = llm_of(loaded, cache_mb=0)
    assert llm.cache is None and not llm.encode(videos[0]).cached and not llm.encode(videos[0]).cached


def test_equal_pixels_give_equal_digests_whatever_their_memory_layout():
    from aim_llava.visual_cache import clip_digest

    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    strided = np.ascontiguousarray(frames[:, :, ::-1])[:, :, ::-1]  # a non-contiguous view of equal pixels
    assert clip_digest(VideoClip(frames, [0, 1], [0.0, 1.0], 2.0, 1.0, "a")) == \
        clip_digest(VideoClip(strided, [0, 1], [0.0, 1.0], 2.0, 1.0, "b"))


@pytest.mark.parametrize("preset", ["baseline", "aim_default"])
def test_prefixes_of_different_lengths_with_equal_questions(loaded, preset):
    """The only padding of the batch is in front of the shorter prefix."""
    tokenizer, model, _, _ = loaded
    reduction = plan(model, preset)
    generator = torch.Generator().manual_seed(2)
    features = [torch.randn(n, 64, generator=generator) * 0.5 for n in (17, 33)]
    prompts = [prompt(tokenizer, "Why?")] * 2
    ids, lengths = prefix_ids(prompts, ["short", "long"], features)
    assert_same_decoding(decoded_logits(model, reduction, prompts, features),
                         decoded_logits(model, reduction, prompts, features, PrefixPrefill(model, ReuseCache(2**30),
                                                                                          ids, lengths)))
