"""The VideoLLM API: encode once, chat, streaming, time-aware prompts, images."""

import pytest
from PIL import Image

from aim_llava.pipeline import SamplingOptions, VideoLLM, time_instruction
from aim_llava.reduction.config import ConfigError
from aim_llava.sample_media import write_sample_video
from aim_llava.video import VideoError


@pytest.fixture(scope="module")
def llm(loaded):
    """Without the reuse cache: these tests count the encodings the explicit API does
    (tests/test_reuse.py covers the cache)."""
    tokenizer, model, processor, _ = loaded
    return VideoLLM(tokenizer, model, processor, sampling=SamplingOptions(num_frames=6), cache_mb=0)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_sample_video(tmp_path_factory.mktemp("pipe") / "clip.mp4", num_frames=60, fps=30)


@pytest.fixture
def tower_calls(llm):
    calls = []
    handle = llm.model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    yield calls
    handle.remove()


def test_chat_encodes_the_video_once(llm, video, tower_calls):
    session = llm.chat(video)
    answers = [session.ask(q, max_new_tokens=4) for q in ("What is it?", "And then?", "Why?")]
    assert len(tower_calls) == 1
    assert len(session.history) == 3 and [a for _, a in session.history] == answers
    prompt = llm.prompt(session.visual, session.history + [("Last one?", None)])
    assert prompt.count("<image>") == 1
    assert prompt.index("What is it?") < prompt.index(answers[0] + "<|im_end|>") < prompt.index("And then?")


def test_encoded_visual_is_reused_by_ask(llm, video, tower_calls):
    visual = llm.encode(video)
    first = llm.ask(visual, "Describe.", max_new_tokens=5)
    second = llm.ask(visual, "Describe.", max_new_tokens=5)
    assert len(tower_calls) == 1 and first == second
    assert llm.ask(video, "Describe.", max_new_tokens=5) == first


def test_stream_callback_sees_the_whole_text(llm, video):
    pieces = []
    text = llm.caption(video, stream=pieces.append, max_new_tokens=12)
    assert "".join(pieces).strip() == text


def test_time_aware_prompt_states_duration_and_times(loaded, video):
    tokenizer, model, processor, _ = loaded
    timed = VideoLLM(tokenizer, model, processor, sampling=SamplingOptions(num_frames=3), time_aware=True)
    visual = timed.encode(video)
    prompt = timed.prompt(visual, [("What happens?", None)])
    assert "The video lasts for 2.00 seconds, and 3 frames are uniformly sampled from it." in prompt
    assert "These frames are located at 0.00s,0.97s,1.97s." in prompt
    assert prompt.index("<image>") < prompt.index(time_instruction(visual.clip)) < prompt.index("What happens?")


def test_image_file_goes_through_anyres(llm, tmp_path):
    Image.new("RGB", (900, 500), (200, 30, 30)).save(tmp_path / "photo.png")
    visual = llm.encode(tmp_path / "photo.png")
    assert visual.modality == "image"
    assert visual.num_tokens > 729 + 1  # base view plus the crop grid with row newlines
    assert isinstance(llm.caption(visual, max_new_tokens=3), str)


def test_bad_options(loaded):
    tokenizer, model, processor, _ = loaded
    with pytest.raises(VideoError):
        SamplingOptions(num_frames=0)
    with pytest.raises(ConfigError, match="unknown preset"):
        VideoLLM.from_pretrained("unused", reduction="fastest_please")
