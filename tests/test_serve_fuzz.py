"""The server under generated hostile requests: whatever the body and headers, the answer is a
completion or an OpenAI-style 4xx error, never a 500 (which would mean an unchecked field reached
the code behind it). Bodies mix the fields the API knows with wrong types, odd paths (links out of
the root and in loops, siblings of the root, playlists, frame directories), images whose content
is not what they declare (EPS, JPEG sent as PNG, text bombs, huge headers) and junk; headers mix
hosts, origins, keys and content types. The server's limits are made small here, so that counts
and budgets are crossed with small requests the tiny model answers quickly."""

import base64
import io
import json
import zlib

import pytest
from conftest import in_process_service, png_chunk, png_data_url, png_header_only
from PIL import Image

from aim_llava.sample_media import write_hls_playlist, write_sample_video

hypothesis = pytest.importorskip("hypothesis", reason="the dev extra installs hypothesis")
st = hypothesis.strategies


def data_url(kind: str, raw: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(raw).decode()}"


def image_bytes(kind: str, width: int = 8, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, format=kind)
    return buffer.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n"
PNG = image_bytes("PNG")
TEXT_BOMB = PNG[:33] + png_chunk(b"zTXt", b"c\x00\x00" + zlib.compress(b"\x00" * (2 << 20))) + PNG[33:]
HUGE_HEADER = png_header_only(60000, 60000)
OVER_BUDGET = png_data_url(100, 60)  # decodes, but 6000 pixels: beyond LIMITS' one image of 4096
INLINE = [data_url("image/png", EPS), data_url("image/png", image_bytes("JPEG")), data_url("image/jpeg", PNG),
          data_url("image/png", TEXT_BOMB), data_url("image/png", HUGE_HEADER), data_url("image/svg+xml", b"<svg/>"),
          data_url("image/gif", image_bytes("GIF")), data_url("image/png", PNG[:40]), data_url("image/webp", EPS)]

JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
URLS = st.sampled_from(["clip.mp4", "sub/../clip.mp4", "file:///clip.mp4", "../outside.mp4", "/etc/passwd",
                        "frame.png", "text.mp4", "missing.mp4", "http://example.com/a.mp4", "data:text/plain,hi",
                        "data:image/png;base64,@@@", png_data_url(24, 16, (0, 90, 200)), "", "x" * 300,
                        "clip\ud800.mp4", "a\x00b",
                        "c:clip.mp4", "file://host/clip.mp4", ".", "loop.mp4", "link.mp4", "playlist.mp4",
                        "list.mp4", "frames", "frames/0.png", "eps.png", "huge.png", "sub", "../fuzz_media0x/a.mp4",
                        "sub/../../fuzz_media0x/a.mp4", OVER_BUDGET, *INLINE]) | st.text(max_size=12)
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
    "frames": st.integers(-1, 4) | st.sampled_from([40, 10**6]) | JUNK,
    "fps": st.floats(-1, 4) | JUNK,
    "max_frames": st.integers(-1, 4) | JUNK,
    "config": st.sampled_from(["aim_default", "budget:0.3", "budget:2", "nope", "fitprune:/etc/passwd"]) | JUNK,
})
FUZZ = hypothesis.settings(max_examples=150, deadline=None, database=None, derandomize=True,
                           suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture,
                                                  hypothesis.HealthCheck.too_slow])


# small bounds, crossed by small requests: 6 messages, 8 parts, 400 characters, 12 frames at
# 384 x 384, one image of 4096 pixels, 8 tokens
LIMITS = dict(max_messages=6, max_content_parts=8, max_text_chars=400, max_request_pixels=12 * 384 * 384,
              max_image_pixels=4096, max_tokens_limit=8, max_data_url_bytes=4096)
KEY = "fuzz-key"


@pytest.fixture(scope="module")
def service(tiny_qwen_dir, tmp_path_factory):
    from aim_llava.serve import ServerLimits

    root = tmp_path_factory.mktemp("fuzz_media")
    assert root.name == "fuzz_media0"
    write_sample_video(root / "clip.mp4", num_frames=12, fps=10)
    (root / "sub").mkdir()
    (root / "text.mp4").write_text("not a video")
    Image.new("RGB", (24, 16)).save(root / "frame.png")
    (root / "eps.png").write_bytes(EPS)
    (root / "huge.png").write_bytes(HUGE_HEADER)
    (root / "frames").mkdir()
    for i in range(3):
        Image.new("RGB", (24, 16), (80 * i, 0, 0)).save(root / "frames" / f"{i}.png")
    outside = root.parent / "fuzz_media0x"  # a sibling whose name starts with the root's
    outside.mkdir()
    write_sample_video(outside / "a.mp4", num_frames=4, fps=4)
    write_sample_video(outside / "a.ts", num_frames=30, fps=10)
    (root / "link.mp4").symlink_to(outside / "a.mp4")
    (root / "frames" / "3.png").symlink_to(root / "frame.png")
    (root / "loop.mp4").symlink_to(root / "loop.mp4")
    write_hls_playlist(root / "playlist.mp4", outside / "a.ts", 3.0)
    (root / "list.mp4").write_text(f"ffconcat version 1.0\nfile {outside / 'a.mp4'}\n")
    with in_process_service(tiny_qwen_dir, root, max_new_tokens=2, max_batch_size=2, max_wait_ms=0,
                            limits=ServerLimits(**LIMITS)) as (_, service):
        yield service


@pytest.fixture(scope="module")
def http(service):
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    with TestClient(create_app(service), raise_server_exceptions=False, base_url="http://localhost") as client:
        yield client


@pytest.fixture(scope="module")
def guarded_http(service):
    """The same service behind a key, an extra host name and an allowed origin."""
    from fastapi.testclient import TestClient

    from aim_llava.serve import AccessPolicy, create_app

    policy = AccessPolicy.for_address("127.0.0.1", [KEY], ["api.example"], ["https://app.example"])
    with TestClient(create_app(service, policy), raise_server_exceptions=False, base_url="http://localhost") as client:
        yield client


def post(http, body):
    raw = json.dumps(body).encode("utf-8", "surrogatepass")  # a lone surrogate is sent as Python escapes it
    return http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})


def assert_answer_or_client_error(response) -> None:
    """A completion (plain or streamed) or a one-line OpenAI-style 4xx error, never a 500."""
    assert response.status_code in (200, 400, 401, 403, 404, 413, 415), (response.status_code, response.text)
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


MANY_MESSAGES = st.integers(1, 9).flatmap(lambda count: st.lists(
    st.sampled_from(["", "w" * 60, "a question"]), min_size=count, max_size=count)).map(
    lambda texts: [{"role": "user", "content": [{"type": "video_url", "video_url": "clip.mp4"}, texts[0]]}]
    + [{"role": "assistant" if i % 2 else "user", "content": text} for i, text in enumerate(texts[1:], 1)])
MANY_IMAGES = st.lists(st.sampled_from(["frame.png", INLINE[6], png_data_url(4, 4), "frames/0.png", "frames/3.png",
                                        OVER_BUDGET, "huge.png"]),
                       min_size=1, max_size=14).map(
    lambda urls: [{"role": "user", "content": [{"type": "image_url", "image_url": url} for url in urls]}])


@FUZZ
@hypothesis.given(messages=MANY_MESSAGES | MANY_IMAGES, max_tokens=st.integers(1, 10))
def test_counts_and_budgets(http, messages, max_tokens):
    """Counts of messages and parts, text with each message's template, images as frames within
    the pixel budget, max_tokens within its limit: each crossed by some example."""
    for message in messages:  # a bare string stands for a text part
        if isinstance(message["content"], list):
            message["content"] = [{"type": "text", "text": part} if isinstance(part, str) else part
                                  for part in message["content"]]
    assert_answer_or_client_error(post(http, {"messages": messages, "max_tokens": max_tokens}))


HEADERS = st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                     "application/x-www-form-urlencoded", "", "APPLICATION/JSON", "json"]),
    "host": st.sampled_from(["localhost", "127.0.0.1:8000", "[::1]:80", "api.example", "evil.example",
                             "localhost.evil.example", "", "a:b:c", "[", "LOCALHOST"]),
    "origin": st.sampled_from(["https://app.example", "https://app.example/", "https://evil.example", "null", ""]),
    "authorization": st.sampled_from([f"Bearer {KEY}", f"bearer {KEY}", f"Bearer {KEY}x", "Bearer", "", KEY,
                                      f"Basic {KEY}", f"Bearer  {KEY}"]),
})


@FUZZ
@hypothesis.given(headers=HEADERS, path=st.sampled_from(["/v1/chat/completions", "/v1/models", "/health", "/v1/x"]))
def test_any_headers(guarded_http, headers, path):
    """Host, Origin, API key and content type in any combination: an answer or a 4xx error."""
    body = json.dumps({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": "clip.mp4"}]}],
                       "max_tokens": 1})
    if path == "/v1/chat/completions":
        response = guarded_http.post(path, content=body, headers=headers)
    else:
        response = guarded_http.get(path, headers=headers)
    assert response.status_code in (200, 400, 401, 403, 404, 405, 413, 415), (response.status_code, response.text)
    if response.status_code >= 400 and response.status_code not in (404, 405):
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]


def user_parts(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def media_part(kind: str, url: str) -> dict:
    return {"type": kind, kind: {"url": url}}


JSON = {"content-type": "application/json"}
WITH_KEY = {**JSON, "authorization": f"Bearer {KEY}"}
VIDEO = user_parts(media_part("video_url", "clip.mp4"))


def ask(messages: list[dict], **fields) -> dict:
    return {"messages": messages, "max_tokens": 1, **fields}


# each request class of issue 23 once, with the refusal it must get (the generated tests above
# only ask for "no 500"): (headers, body, status, error code)
HOSTILE = {
    "bad Host (DNS rebinding)": ({**WITH_KEY, "host": "evil.example"}, ask(VIDEO), 400, "invalid_host"),
    "Host that merely starts with localhost": ({**WITH_KEY, "host": "localhost.evil.example"}, ask(VIDEO), 400,
                                                "invalid_host"),
    "no API key": (JSON, ask(VIDEO), 401, "invalid_api_key"),
    "wrong API key": ({**JSON, "authorization": f"Bearer {KEY}x"}, ask(VIDEO), 401, "invalid_api_key"),
    "key without Bearer": ({**JSON, "authorization": KEY}, ask(VIDEO), 401, "invalid_api_key"),
    "text/plain body": ({**WITH_KEY, "content-type": "text/plain"}, ask(VIDEO), 415, "unsupported_media_type"),
    "form body": ({**WITH_KEY, "content-type": "application/x-www-form-urlencoded"}, ask(VIDEO), 415,
                  "unsupported_media_type"),
    "origin not allowed": ({**WITH_KEY, "origin": "https://evil.example"}, ask(VIDEO), 403, "origin_not_allowed"),
    "huge image (decodes)": (WITH_KEY, ask(user_parts(media_part("image_url", OVER_BUDGET))), 400, "unreadable_media"),
    "huge image (header only)": (WITH_KEY, ask(user_parts(media_part("image_url", INLINE[4]))), 400, "unreadable_media"),
    "huge image named as a video": (WITH_KEY, ask(user_parts(media_part("video_url", "huge.png"))), 400,
                                    "unreadable_media"),
    "many empty messages": (WITH_KEY, ask(VIDEO + [{"role": r, "content": ""} for r in ["assistant", "user"] * 3]), 413,
                            "too_large"),
    "many content parts": (WITH_KEY, ask(user_parts(*[{"type": "text", "text": ""}] * 9, media_part("video_url", "clip.mp4"))),
                           413, "too_large"),
    "frames beyond the pixel budget": (WITH_KEY, ask(VIDEO, frames=13), 400, "unreadable_media"),
    "EPS declared as PNG": (WITH_KEY, ask(user_parts(media_part("image_url", INLINE[0]))), 400, "unreadable_media"),
    "JPEG declared as PNG": (WITH_KEY, ask(user_parts(media_part("image_url", INLINE[1]))), 400, "unreadable_media"),
    "SVG": (WITH_KEY, ask(user_parts(media_part("image_url", INLINE[5]))), 400, "unsupported_image_type"),
    "EPS in a .png file": (WITH_KEY, ask(user_parts(media_part("image_url", "eps.png"))), 400, "unreadable_media"),
    "HLS playlist of an outside file": (WITH_KEY, ask(user_parts(media_part("video_url", "playlist.mp4"))), 400,
                                        "unreadable_media"),
    "concat list of an outside file": (WITH_KEY, ask(user_parts(media_part("video_url", "list.mp4"))), 400,
                                       "unreadable_media"),
    "link out of the root": (WITH_KEY, ask(user_parts(media_part("video_url", "link.mp4"))), 403, "outside_media_root"),
    "sibling of the root": (WITH_KEY, ask(user_parts(media_part("video_url", "../fuzz_media0x/a.mp4"))), 403,
                            "outside_media_root"),
    "link loop": (WITH_KEY, ask(user_parts(media_part("video_url", "loop.mp4"))), 400, "invalid_request"),
    "frame directory with a link": (WITH_KEY, ask(user_parts(media_part("video_url", "frames"))), 400, "unreadable_media"),
    "unclosed IPv6 bracket": (WITH_KEY, ask(user_parts(media_part("video_url", "//[x"))), 400, "invalid_request"),
    "file URL with an unclosed bracket": (WITH_KEY, ask(user_parts(media_part("video_url", "file://[x"))), 400,
                                          "invalid_request"),
    "NUL quoted in a file URL": (WITH_KEY, ask(user_parts(media_part("video_url", "file:///clip%00.mp4"))), 400,
                                 "invalid_request"),
    "media path over 4096 characters": (WITH_KEY, ask(user_parts(media_part("video_url", "a/" * 2049))), 400,
                                        "invalid_request"),
    "stop sequence over 256 characters": (WITH_KEY, ask(VIDEO, stop=["s" * 257]), 400, "invalid_request"),
    "many JSON values": (WITH_KEY, ask(VIDEO, metadata=[{}] * 2000), 400, "too_many_values"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_each_hostile_request_class_is_refused(guarded_http, name):
    headers, body, status, code = HOSTILE[name]
    response = guarded_http.post("/v1/chat/completions", content=json.dumps(body), headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and "\n" not in error["message"] and "fuzz_media0" not in error["message"], error
