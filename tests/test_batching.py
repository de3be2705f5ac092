"""Batched inference end to end: lists through VideoLLM, the command's --batch-size and
--workers, failures that stay their item's own, reading ahead, and Ctrl-C with --resume."""

import json
import subprocess
import sys
import threading
import time

import pytest
from conftest import random_frames, without_dtype_note

from aim_llava.cli import main
from aim_llava.pipeline import BatchError, Request, SamplingOptions, VideoLLM
from aim_llava.prefetch import batches, read_ahead
from aim_llava.sample_media import write_sample_video


@pytest.fixture(scope="module")
def llm(loaded):
    tokenizer, model, processor, _ = loaded
    return VideoLLM(tokenizer, model, processor, sampling=SamplingOptions(num_frames=4))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    return [write_sample_video(root / f"v{i}.mp4", num_frames=12 + 7 * i, fps=10 + i) for i in range(6)]


def test_list_of_videos_equals_one_by_one(llm, clips):
    questions = ["What is shown?", "Describe every bar you can see in this clip.", "Colour?", "Why?", "How many?",
                 "What happens at the end of the video?"]
    batched = llm.ask(clips, questions, batch_size=4, max_new_tokens=8)
    assert batched == [llm.ask(clip, question, max_new_tokens=8) for clip, question in zip(clips, questions)]
    assert llm.caption(clips[:3], batch_size=2, max_new_tokens=6) == [llm.caption(c, max_new_tokens=6)
                                                                      for c in clips[:3]]


def test_failing_items_stay_their_own(llm, clips, tmp_path):
    (tmp_path / "broken.mp4").write_text("not a video\n" * 20)
    long_question = "word " * 40000  # longer than the model's context on its own
    requests = [Request(clips[0], [("Hi?", None)]), Request(tmp_path / "missing.mp4", [("Hi?", None)]),
                Request(clips[1], [(long_question, None)]), Request(tmp_path / "broken.mp4", [("Hi?", None)]),
                Request(clips[2], [("Hi?", None)])]
    results = list(llm.run(requests, batch_size=5, max_new_tokens=4))
    assert [result.error is None for result in results] == [True, False, False, False, True]
    assert "file not found" in str(results[1].error) and "cannot decode" in str(results[3].error)
    assert "more than the model's" in str(results[2].error)
    assert results[0].response.text == llm.ask(clips[0], "Hi?", max_new_tokens=4)
    with pytest.raises(BatchError) as info:
        llm.caption([clips[0], tmp_path / "missing.mp4"], max_new_tokens=2)
    assert len(info.value.results) == 2 and info.value.results[0].error is None


def test_read_ahead_keeps_order_bounds_work_and_reports_failures():
    active, peak, lock = [0], [0], threading.Lock()
    # the first three loads wait for each other: they finish only if all three workers run at once
    first_three = threading.Barrier(3, timeout=30)

    def load(item):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        if item < 3:
            first_three.wait()
        time.sleep(0.01 * (item % 3))
        with lock:
            active[0] -= 1
        if item == 5:
            raise ValueError("item 5 cannot be read")
        return item * 10

    out = list(read_ahead(range(12), load, workers=3, depth=4))
    assert [item for item, _ in out] == list(range(12))
    assert [value for item, value in out if item != 5] == [i * 10 for i in range(12) if i != 5]
    assert isinstance(out[5][1], ValueError)
    assert peak[0] == 3  # concurrent, and never more than the workers
    assert [len(b) for b in batches(range(7), 3)] == [3, 3, 1]


def test_read_ahead_stops_reading_when_the_consumer_stops():
    loaded = []

    def load(item):
        loaded.append(item)
        time.sleep(0.02)
        return item

    for item, _ in read_ahead(range(100), load, workers=2, depth=4):
        if item == 2:
            break
    time.sleep(0.2)
    assert len(loaded) <= 8  # the rest was never started


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_command_batch_size_gives_the_same_records(capsys, tiny_qwen_dir, clips, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(map(str, clips[:4])) + f"\n{tmp_path / 'missing.mp4'}\n" + str(clips[4]) + "\n")
    outputs = {}
    for size in (1, 3):
        outputs[size] = tmp_path / f"b{size}.jsonl"
        code = main(["caption", str(listing), "--model", str(tiny_qwen_dir), "--frames", "4", "--max-new-tokens", "6",
                     "--batch-size", str(size), "--workers", "2", "--output", str(outputs[size])])
        assert code == 2  # the missing video
    capsys.readouterr()
    keep = ("video", "question", "text", "error", "frames", "visual_tokens")
    one, three = records(outputs[1]), records(outputs[3])
    assert [{k: r.get(k) for k in keep} for r in one] == [{k: r.get(k) for k in keep} for r in three]
    assert [r["error"] is None for r in three] == [True] * 4 + [False, True]


def test_interrupted_batched_run_resumes_without_loss(tiny_qwen_dir, clips, tmp_path):
    output = tmp_path / "out.jsonl"
    base = [sys.executable, "-c", None]
    code = ("import sys, aim_llava.pipeline as p\n"
            "original = p.VideoLLM.answer_batch\n"
            "calls = []\n"
            "def stop_on_third(self, *a, **k):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 3: raise KeyboardInterrupt\n"
            "    return original(self, *a, **k)\n"
            "p.VideoLLM.answer_batch = stop_on_third\n"
            "from aim_llava.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    args = ["caption", *map(str, clips), "--model", str(tiny_qwen_dir), "--frames", "3", "--max-new-tokens", "4",
            "--batch-size", "2", "--output", str(output)]
    base[2] = code
    first = subprocess.run(base + args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 130, first.stderr[-2000:]
    saved = records(output)
    assert [r["video"] for r in saved] == list(map(str, clips[:4]))  # two whole batches, nothing torn
    second = subprocess.run([sys.executable, "-m", "aim_llava.cli", *args, "--resume"], capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    final = records(output)
    assert [r["video"] for r in final] == list(map(str, clips)) and final[:4] == saved


def test_frame_counts_beyond_the_context_are_refused_before_decoding(capsys, tiny_qwen_dir, clips, monkeypatch):
    import aim_llava.video as video

    def no_decoding(*args):
        raise AssertionError("a frame was decoded")

    for name in list(video.READERS):
        monkeypatch.setitem(video.READERS, name, no_decoding)
    for extra, message in [(["--frames", "100000"], "fit in the model's context"),
                           (["--frames", str(10**20)], "at most 100000 frames")]:
        code = main(["caption", str(clips[0]), "--model", str(tiny_qwen_dir), *extra])
        err = without_dtype_note(capsys.readouterr().err)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_fps_sampling_beyond_the_context_is_refused_before_decoding(llm, tmp_path):
    from aim_llava.video import VideoError

    long_clip = write_sample_video(tmp_path / "long.mp4", num_frames=300, fps=30)
    small = VideoLLM(llm.tokenizer, llm.model, llm.image_processor, sampling=SamplingOptions(fps=30.0))
    llm.model.config.tokenizer_model_max_length, saved = 196 * 50, llm.model.config.tokenizer_model_max_length
    try:
        with pytest.raises(VideoError, match="gives 300 frames but at most 49 fit"):
            small.load(long_clip)
    finally:
        llm.model.config.tokenizer_model_max_length = saved


def test_device_preprocessing_feeds_the_model(llm):
    frames = random_frames(3, 120, 200)
    pixels = llm.image_processor.preprocess_frames(frames, llm.model.device, llm.model.dtype)
    assert pixels.shape == (3, 3, 384, 384) and pixels.dtype == llm.model.dtype
