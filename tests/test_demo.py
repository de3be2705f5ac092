"""The demo page's requests, without a browser: bad input of every kind is a message on the page
(never a traceback), the server's limits and media root hold, and a good request after them is
answered under both presets (tests/test_demo_browser.py drives the page itself)."""

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

from aim_llava.demo import DemoApp  # noqa: E402
from aim_llava.pipeline import GenerationOptions, SamplingOptions, VideoLLM  # noqa: E402
from aim_llava.sample_media import write_sample_video  # noqa: E402
from aim_llava.server.limits import ServerLimits  # noqa: E402

QUESTION = "What moves?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_media")
    (root / "videos").mkdir()
    write_sample_video(root / "videos" / "clip.mp4", num_frames=20, fps=10)
    (root / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    Image.new("RGB", (300, 300), (200, 30, 30)).save(root / "large.png")
    outside = tmp_path_factory.mktemp("outside")
    write_sample_video(outside / "secret.mp4", num_frames=10, fps=10)
    (root / "link.mp4").symlink_to(outside / "secret.mp4")
    return root


@pytest.fixture(scope="module")
def app(tiny_qwen_dir, media):
    llm = VideoLLM.from_pretrained(tiny_qwen_dir, device="cpu", dtype="float32",
                                   sampling=SamplingOptions(num_frames=2),
                                   generation=GenerationOptions(max_new_tokens=3))
    app = DemoApp(llm, media, ServerLimits(max_image_pixels=200 * 200))
    yield app
    app.close()


def final(updates: list[dict]) -> dict:
    merged = {}
    for update in updates:
        merged.update(update)
    return merged


def ask(app, upload=None, media_path=None, question=QUESTION, preset_a="baseline", preset_b="aim_default",
        frames=2, fps=0) -> dict:
    return final(list(app.run(upload, media_path, question, preset_a, preset_b, frames, fps)))


@pytest.mark.parametrize("request_, message", [
    ({"upload": "{root}/bad.mp4"}, "cannot decode bad.mp4"),
    ({"media_path": "bad.mp4"}, "cannot decode bad.mp4"),
    ({"media_path": "videos/clip.mp4", "preset_b": "nonsense"}, "unknown config 'nonsense'"),
    ({"media_path": "videos/clip.mp4", "question": "a" * 2**20}, "at most 1,048,544 are taken"),
    ({"media_path": "videos/clip.mp4", "question": "dog " * 40_000}, "more than the model's"),
    ({"media_path": "videos/clip.mp4", "frames": 100_000}, "fit"),
    ({"media_path": "videos/clip.mp4", "frames": -3}, "'frames' must lie in"),
    ({"media_path": "large.png"}, "more than the 40,000 allowed"),
    ({"media_path": "../outside/secret.mp4"}, "outside the server's media root"),
    ({"media_path": "link.mp4"}, "outside the server's media root"),
    ({"media_path": "missing.mp4"}, "not found"),
    ({}, "Upload a video or image first"),
    ({"media_path": "videos/clip.mp4", "question": "   "}, "Ask a question"),
    ({"media_path": "videos/clip.mp4", "preset_a": "", "preset_b": "(none)"}, "Choose a preset"),
])
def test_bad_requests_are_a_message_on_the_page(app, media, request_, message):
    request_ = {name: value.format(root=media) if isinstance(value, str) and name == "upload" else value
                for name, value in request_.items()}
    shown = ask(app, **request_)
    assert shown["message"].startswith(("**Not answered:**", "Upload", "Ask", "Choose")), shown["message"]
    assert message in shown["message"] and "Traceback" not in shown["message"]
    assert "runs" not in shown and "\n" not in shown["message"]


def test_a_model_failure_is_a_message_and_the_page_goes_on(app, monkeypatch, media):
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    with monkeypatch.context() as patch:
        patch.setattr(app.llm, "respond", broken)
        shown = ask(app, media_path="videos/clip.mp4")
    assert shown["message"] == "**The model failed on this request** (RuntimeError); see the log."
    shown = ask(app, upload=str(media / "videos" / "clip.mp4"))
    assert shown["message"] == "Done: baseline, aim_default."
    runs = shown["runs"]
    assert [run.config for run in runs] == ["baseline", "aim_default"]
    assert shown["answer_a"] == runs[0].answer and shown["answer_b"] == runs[1].answer
    assert shown["picture_a"].size == runs[0].picture(shown["layer"]).size
    assert "visual tokens into the LLM: **393**" in shown["figures_a"]  # 2 frames x 196 + 1
    assert "visual tokens into the LLM: **99**" in shown["figures_b"]  # 2 frames x 49 + 1 after merging
    redrawn = app.pictures(runs, 0)
    assert "99 of 99 visual tokens entering layer 0" in redrawn["caption_b"]


def test_the_page_answers_on_a_qwen2_5_vl_checkpoint(tiny_qwen25_dir, media):
    """The sample clip's frames of 96 x 160 become 84 x 168 pixels (both sides rounded to
    multiples of 28): 3 x 6 = 18 tokens a temporal group of 2 frames; each panel draws every
    sampled frame (Qwen's rule samples at least 4)."""
    llm = VideoLLM.from_pretrained(tiny_qwen25_dir, device="cpu", dtype="float32",
                                   generation=GenerationOptions(max_new_tokens=3))
    app = DemoApp(llm, media, ServerLimits())
    try:
        shown = ask(app, media_path="videos/clip.mp4")
    finally:
        app.close()
    assert shown["message"] == "Done: baseline, aim_default.", shown["message"]
    baseline, merged = shown["runs"]
    frames = len(baseline.pictures)
    assert frames == 4 and baseline.origins.num_tokens == frames // 2 * 18
    assert f"visual tokens into the LLM: **{frames // 2 * 18}**" in shown["figures_a"]
    assert "% of no reduction" not in shown["figures_a"]  # the formula counts frames of 448 x 448
    assert 0 < merged.origins.num_tokens < baseline.origins.num_tokens
    assert f"visual tokens into the LLM: **{merged.origins.num_tokens}**" in shown["figures_b"]
    for panel in ("a", "b"):
        assert shown[f"picture_{panel}"].width == frames * 160 + (frames - 1) * 4  # one tile per frame
        assert "does not say" not in shown[f"caption_{panel}"]
