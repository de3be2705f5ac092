"""The server under generated hostile requests: whatever the body, the answer is a completion or
an OpenAI-style 4xx error, never a 500 (which would mean an unchecked field reached the code
behind it). Bodies mix the fields the API knows with wrong types, odd paths and junk; sizes are
kept small enough for the tiny model to answer the valid ones quickly."""

import json

import pytest
from conftest import in_process_service, png_data_url
from PIL import Image

from aim_llava.sample_media import write_sample_video

hypothesis = pytest.importorskip("hypothesis", reason="the dev extra installs hypothesis")
st = hypothesis.strategies


JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
URLS = st.sampled_from(["clip.mp4", "sub/../clip.mp4", "file:///clip.mp4", "../outside.mp4", "/etc/passwd",
                        "frame.png", "text.mp4", "missing.mp4", "http://example.com/a.mp4", "data:text/plain,hi",
                        "data:image/png;base64,@@@", png_data_url(24, 16, (0, 90, 200)), "", "x" * 300,
                        "clip\ud800.mp4", "a\x00b",
                        "c:clip.mp4", "file://host/clip.mp4", "."]) | st.text(max_size=12)
URL_VALUE = st.fixed_dictionaries({"url": URLS}) | URLS | JUNK
MEDIA_PART = (st.fixed_dictionaries({"type": st.just("video_url"), "video_url": URL_VALUE})
              | st.fixed_dictionaries({"type": st.just("image_url"), "image_url": URL_VALUE}))
PART = st.one_of(MEDIA_PART, st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20) | JUNK}),
                 JUNK)
USER_MEDIA = st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(MEDIA_PART | PART, min_size=1,
                                                                                 max_size=4)})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", ""]) | JUNK},
    optional={"content": st.text(max_size=20) | st.lists(PART, max_size=4) | JUNK})
VALID_START = st.just([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}},
                                                    {"type": "text", "text": "What?"}]}])
MESSAGES = st.one_of(VALID_START, st.lists(USER_MEDIA, min_size=1, max_size=2),
                     st.tuples(USER_MEDIA, st.lists(MESSAGE, max_size=3)).map(lambda pair: [pair[0], *pair[1]]),
                     st.lists(MESSAGE, max_size=4), JUNK)
FIELDS = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["tiny", "gpt-4o"]) | JUNK,
    "max_tokens": st.integers(-2, 3) | JUNK,
    "max_completion_tokens": st.integers(-2, 3) | JUNK,
    "temperature": st.floats(-1, 3) | JUNK,
    "top_p": st.floats(-0.5, 1.5) | JUNK,
    "seed": st.integers(-(2**64), 2**64) | JUNK,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | JUNK,
    "stream": st.booleans() | JUNK,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | JUNK}) | JUNK,
    "n": st.integers(0, 3) | JUNK,
    "frames": st.integers(-1, 4) | st.just(10**6) | JUNK,
    "fps": st.floats(-1, 4) | JUNK,
    "max_frames": st.integers(-1, 4) | JUNK,
    "config": st.sampled_from(["aim_default", "budget:0.3", "budget:2", "nope", "fitprune:/etc/passwd"]) | JUNK,
})
FUZZ = hypothesis.settings(max_examples=150, deadline=None, database=None, derandomize=True,
                           suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                                  hypothesis.HealthCheck.too_slow])


@pytest.fixture(scope="module")
def http(tiny_qwen_dir, tmp_path_factory):
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    root = tmp_path_factory.mktemp("fuzz_media")
    write_sample_video(root / "clip.mp4", num_frames=12, fps=10)
    (root / "sub").mkdir()
    (root / "text.mp4").write_text("not a video")
    Image.new("RGB", (24, 16)).save(root / "frame.png")
    with in_process_service(tiny_qwen_dir, root, max_new_tokens=2, max_batch_size=2, max_wait_ms=0) as (_, service):
        with TestClient(create_app(service), raise_server_exceptions=False) as client:
            yield client


def post(http, body):
    raw = json.dumps(body).encode("utf-8", "surrogatepass")  # a lone surrogate is sent as Python escapes it
    return http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})


def assert_answer_or_client_error(response) -> None:
    """A completion (plain or streamed) or a one-line OpenAI-style 4xx error, never a 500."""
    assert response.status_code in (200, 400, 403, 404, 413), (response.status_code, response.text)
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert "\n" not in error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" or '"error"' in events[-1]
    else:
        assert response.json()["choices"][0]["message"]["role"] == "assistant"


@FUZZ
@hypothesis.given(part=MEDIA_PART, text=st.booleans())
def test_any_media_reference(http, part, text):
    content = [part, {"type": "text", "text": "What?"}] if text else [part]
    assert_answer_or_client_error(post(http, {"messages": [{"role": "user", "content": content}]}))


@FUZZ
@hypothesis.given(messages=MESSAGES)
def test_any_message_structure(http, messages):
    assert_answer_or_client_error(post(http, {"messages": messages}))


@FUZZ
@hypothesis.given(body=st.tuples(VALID_START, FIELDS).map(lambda pair: {"messages": pair[0], **pair[1]}) | JUNK)
def test_any_request_fields(http, body):
    assert_answer_or_client_error(post(http, body))
