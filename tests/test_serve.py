"""aim-llava serve, driven by the official openai client against a real server process on
127.0.0.1: answers equal the command line's, streaming, concurrency, every class of bad request,
a client that disconnects mid-stream, and server errors that do not kill the server."""

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import (
    free_port,
    in_process_service,
    png_data_url,
    png_header_only,
    record_new_tokens,
    serve_in_thread,
    serve_process,
    without_dtype_note,
)
from PIL import Image

from aim_llava.cli import main
from aim_llava.sample_media import write_sample_video

openai = pytest.importorskip("openai", reason="the dev extra installs openai")

QUESTION = "What is shown in the video?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    for i in range(4):
        write_sample_video(root / f"clip{i}.mp4", num_frames=20 + 10 * i, fps=20)
    (root / "sub").mkdir()
    write_sample_video(root / "sub" / "nested.mp4", num_frames=30, fps=20)
    outside = tmp_path_factory.mktemp("outside")
    write_sample_video(outside / "secret.mp4", num_frames=10, fps=10)
    (root / "link.mp4").symlink_to(outside / "secret.mp4")
    (root / "loop.mp4").symlink_to(root / "loop.mp4")
    (root / "not_a_video.mp4").write_bytes(b"plain text, not a video")
    Image.new("RGB", (32, 24), (10, 200, 10)).save(root / "frame.png")
    for sibling in (f"{root.name}x", f"{root.name}-sibling"):  # names that start with the root's
        (root.parent / sibling).mkdir()
        write_sample_video(root.parent / sibling / "secret.mp4", num_frames=10, fps=10)
    return root


@pytest.fixture(scope="module")
def server(tiny_qwen_dir, media, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--model", tiny_qwen_dir, "--media-root", media, "--device", "cpu", "--frames", 4, "--max-new-tokens", 8,
            "--max-batch-size", 8, "--max-wait-ms", 50, "--served-model-name", "tiny"]
    with serve_process(args, log) as (base, process):
        yield base, process, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def video_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def cli_answer(capsys, tiny_qwen_dir, video: Path, question: str = QUESTION) -> str:
    assert main(["ask", str(video), question, "--model", str(tiny_qwen_dir), "--frames", "4",
                 "--max-new-tokens", "8"]) == 0
    return capsys.readouterr().out.strip()


def test_health_and_models(server, client):
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}
    assert [model.id for model in client.models.list().data] == ["tiny"]
    assert re.search(r"warmed up in \d+\.\d s", server[2].read_text())  # before it took requests


def test_a_server_whose_warm_up_fails_does_not_start(capsys, tiny_qwen_dir, media):
    """170 frames of 196 tokens exceed the tiny model's 32,768-token context: the warm-up request
    fails as every request would, so the server refuses to start with a one-line error."""
    code = main(["serve", "--model", str(tiny_qwen_dir), "--media-root", str(media), "--device", "cpu",
                 "--frames", "170", "--port", str(free_port())])
    error = without_dtype_note(capsys.readouterr().err).strip()
    assert code == 2 and error.startswith("aim-llava: error: the warm-up request (170 frames) failed")
    assert "use fewer frames" in error and "\n" not in error


def test_plain_and_streamed_answers_equal_the_command_line(client, media, capsys, tiny_qwen_dir):
    expected = cli_answer(capsys, tiny_qwen_dir, media / "clip1.mp4")
    reply = client.chat.completions.create(model="tiny", messages=video_message("clip1.mp4"), max_tokens=8)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 4 * 196
    pieces, usage = [], None
    stream = client.chat.completions.create(model="tiny", messages=video_message(f"file://{media}/clip1.mp4"),
                                            max_tokens=8, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
    assert "".join(pieces) == expected
    assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens


def test_multi_turn_system_and_stop(client):
    messages = [{"role": "system", "content": "You describe videos."}, *video_message("clip0.mp4"),
                {"role": "assistant", "content": "Bars."}, {"role": "user", "content": "And then?"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8).choices[0].message.content
    assert full
    stop = full[3:5]
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, stop=[stop], stream=True) if c.choices]
    assert "".join(pieces) == full[: full.index(stop)]


def test_unsupported_fields_at_their_neutral_values_are_accepted(client):
    """What clients send by default (logprobs false, zero penalties, a text response format) changes
    nothing and is taken; only values that would change the reply are refused."""
    neutral = {"logprobs": False, "frequency_penalty": 0.0, "presence_penalty": 0, "logit_bias": {},
               "response_format": {"type": "text"}, "tools": [], "user": "someone", "metadata": {"a": "b"}}
    plain = client.chat.completions.create(model="tiny", messages=video_message("clip2.mp4"), max_tokens=4)
    with_neutral = client.chat.completions.create(model="tiny", messages=video_message("clip2.mp4"), max_tokens=4,
                                                  extra_body=neutral)
    assert with_neutral.choices[0].message.content == plain.choices[0].message.content


def test_sampling_with_a_seed_reproduces_and_seeds_differ(client):
    """The same seed gives the same text; other seeds give other texts (a server that ignored
    sampling would give one greedy text for all of them)."""
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=video_message("clip2.mp4"), max_tokens=8,
                                              temperature=1.5, top_p=0.9, seed=seed).choices[0].message.content

    first = sample(3)
    assert sample(3) == first
    assert len({first, sample(4), sample(5)}) > 1


def test_image_and_frames_as_images(client, media):
    url = png_data_url(64, 48, (200, 30, 30))
    one = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": "What colour?"}]}]
    assert client.chat.completions.create(model="tiny", messages=one, max_tokens=4).choices[0].message.content
    frames = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 3
               + [{"type": "text", "text": "What happens?"}]}]
    reply = client.chat.completions.create(model="tiny", messages=frames, max_tokens=4)
    assert reply.usage.prompt_tokens > 3 * 196  # three frames of a video, 196 tokens each


def test_sixteen_concurrent_requests_equal_one_at_a_time(client):
    questions = [f"Question number {i}: what is in the video?" for i in range(16)]
    alone = [client.chat.completions.create(model="tiny", messages=video_message(f"clip{i % 4}.mp4", q),
                                            max_tokens=6).choices[0].message.content
             for i, q in enumerate(questions[:4])]
    answers, errors = [None] * 16, []

    def ask(i):
        try:
            reply = client.chat.completions.create(model="tiny", messages=video_message(f"clip{i % 4}.mp4", questions[i]),
                                                   max_tokens=6)
            answers[i] = reply.choices[0].message.content
        except Exception as err:  # collected and reported below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and all(answer is not None for answer in answers)
    assert answers[:4] == alone  # batched together, the same greedy answers


def error_of(server_url: str, body, status: int) -> dict:
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    response = httpx.post(f"{server_url}/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"}, timeout=120)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    return error


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"messages": "hi"}, 400, "non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "a.wav"}}]}]}, 400,
     "unknown content type"),
    ({"messages": video_message("absent.mp4")}, 404, "not found"),
    ({"messages": video_message("../outside/secret.mp4")}, 403, "outside the server's media root"),
    ({"messages": video_message("/etc/passwd")}, 403, "outside the server's media root"),
    ({"messages": video_message("link.mp4")}, 403, "outside the server's media root"),
    ({"messages": video_message("{root}x/secret.mp4")}, 403, "outside the server's media root"),
    ({"messages": video_message("file://{root}-sibling/secret.mp4")}, 403, "outside the server's media root"),
    ({"messages": video_message("../{name}x/secret.mp4")}, 403, "outside the server's media root"),
    ({"messages": video_message("sub/../../{name}-sibling/secret.mp4")}, 403, "outside the server's media root"),
    ({"messages": video_message("http://example.com/v.mp4")}, 400, "not fetched"),
    ({"messages": video_message("clip0.mp4"), "frames": 100000}, 400, "fit in the model's context"),
    ({"messages": video_message("clip0.mp4", "word " * 40000)}, 400, "more than the model's"),
    ({"messages": video_message("clip0.mp4", "w" * (2**20 + 1))}, 413, "the server takes at most 1,048,576"),
    ({"messages": video_message("clip0.mp4"), "max_tokens": 0}, 400, "'max_tokens' must lie in"),
    ({"messages": video_message("clip0.mp4"), "temperature": "hot"}, 400, "'temperature' must be a finite number"),
    ({"messages": video_message("clip0.mp4"), "n": 2}, 400,
     "Unsupported value: 'n' does not support 2 with this model. Only the default (1) value is supported."),
    ({"messages": video_message("clip0.mp4"), "config": "/etc/passwd.yaml"}, 400, "unknown config"),
    ({"messages": video_message("clip0.mp4"), "config": "budget:7"}, 400, "fraction must lie in"),
    ({"messages": video_message("clip0.mp4"), "model": "gpt-4o"}, 404, "not served here"),
    ({"messages": video_message("clip0.mp4") + [{"role": "user", "content": "twice"}]}, 400, "alternate"),
    ({"messages": video_message("clip0.mp4"), "logprobs": True}, 400, "'logprobs' is not supported"),
    ({"messages": video_message("clip0.mp4"), "response_format": {"type": "json_object"}}, 400,
     "'response_format' is not supported"),
    ({"messages": video_message("clip0.mp4"), "frequency_penalty": 0.5}, 400, "'frequency_penalty' is not supported"),
    ({"messages": video_message("clip0.mp4"), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "'tools' is not supported"),
    (b"[" * 100_000, 400, "nested too deeply"),
    (b'{"messages": 1' + b"1" * 5000 + b"}", 400, "integer of over 4,300 digits"),
    (b'{"messages": "\xff"}', 400, "not UTF-8"),
    ({"messages": video_message("a" * 300)}, 400, "cannot be used on this server (File name too long)"),
    ({"messages": video_message("a" * 5000)}, 400, "a media reference may hold at most 4,096 characters, not 5,000"),
    ({"messages": video_message("clip\ud800.mp4")}, 400, "cannot be used on this server"),
    ({"messages": video_message("clip0.mp4"), "stream": True, "stream_options": {"include_usage": "no"}}, 400,
     "'stream_options.include_usage' must be true or false"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "not_a_video.mp4"}]
                    + [{"type": "image_url", "image_url": "frame.png"}] * 999}]}, 400,
     "1000 images as frames but at most"),  # counted before any is decoded
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "frame.png"}] * 2000}]}, 413,
     "more than 1,024 content parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "frame.png"}] * 1000}],
      "config": "aim_merge1"}, 400, "more than the 134,217,728 a request may hold"),  # 4 tokens a frame: they fit
])
def test_bad_requests_get_openai_style_errors(server, media, body, status, words):
    body = json.loads(json.dumps(body).replace("{root}", str(media)).replace("{name}", media.name)) \
        if isinstance(body, dict) else body
    assert words in error_of(server[0], body, status)["message"]


def test_images_beyond_the_pixel_limit_are_refused_before_decoding(server, media):
    """A few hundred KB of PNG can declare gigabytes of pixels: one image may have at most 2**26
    (8192 x 8192), checked from its header before it is decoded, whether it comes inline, as an
    image_url or as a video_url naming an image file (which today went to the video reader and
    decoded 144 million pixels)."""
    from aim_llava.serve import ServerLimits

    assert ServerLimits().max_image_pixels == 8192 * 8192
    bomb = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(12000, 12000)}}]}]
    assert "an inline image is 12000x12000 pixels" in error_of(server[0], {"messages": bomb}, 400)["message"]
    (media / "huge.png").write_bytes(png_header_only(12000, 12000))
    for kind in ("image_url", "video_url"):
        named = [{"role": "user", "content": [{"type": kind, kind: {"url": "huge.png"}}]}]
        assert "huge.png is 12000x12000 pixels" in error_of(server[0], {"messages": named}, 400)["message"]


def test_a_web_page_cannot_drive_the_server(server):
    """The review found a text/plain body with Host: evil.example answered 200: a page the user
    visits could post it (no CORS preflight for text/plain), and with its name rebound to
    127.0.0.1 (DNS rebinding) even read the answer."""
    raw = json.dumps({"messages": video_message("clip0.mp4"), "max_tokens": 1})
    for headers, status, code in (({"Content-Type": "text/plain", "Host": "evil.example"}, 400, "invalid_host"),
                                  ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
                                  ({"Content-Type": "application/json", "Origin": "https://evil.example"}, 403,
                                   "origin_not_allowed")):
        response = httpx.post(f"{server[0]}/v1/chat/completions", content=raw, headers=headers, timeout=120)
        assert response.status_code == status and response.json()["error"]["code"] == code, response.text


def test_errors_name_media_as_the_client_did(server, media):
    """An undecodable file, or a link loop, is reported by the client's own reference, never by
    the server path it resolved to (which would reveal where the media root lies)."""
    message = error_of(server[0], {"messages": video_message("sub/../not_a_video.mp4")}, 400)["message"]
    assert "cannot decode sub/../not_a_video.mp4 as a video" in message and "/proc/" not in message
    loop = error_of(server[0], {"messages": video_message("loop.mp4")}, 400)["message"]
    assert "too many levels of symbolic links" in loop and str(media) not in loop


def test_the_config_cache_stays_bounded(tiny_qwen_dir, media):
    """Every spelling of a budget is a new cache key: a client inventing them cannot grow the
    server's memory without bound, and a config pushed out is resolved again when asked for."""
    from aim_llava.server.requests import MAX_CACHED_CONFIGS

    with in_process_service(tiny_qwen_dir, media, frames=8) as (llm, service):
        parser = service.parser
        first = parser.reduction("budget:0.15")
        spellings = [f"budget:0.15{'0' * zeros}" for zeros in range(1, MAX_CACHED_CONFIGS + 50)]
        assert all(parser.reduction(spec) == first for spec in spellings)
        cache = parser.resolve_config.cache_info()
        assert cache.currsize == MAX_CACHED_CONFIGS and cache.misses == len(spellings) + 1
        assert parser.reduction("budget:0.15") == first == llm.resolve("budget:0.15")
        assert parser.resolve_config.cache_info().misses == cache.misses + 1  # it had been pushed out


def test_disconnect_mid_stream_disturbs_no_one(server, client):
    base, process, _ = server
    body = {"model": "tiny", "messages": video_message("clip3.mp4"), "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # leave after the first event
    reply = client.chat.completions.create(model="tiny", messages=video_message("clip3.mp4"), max_tokens=8)
    assert reply.choices[0].message.content and process.poll() is None


def test_server_errors_are_500_and_the_server_goes_on(tiny_qwen_dir, media, monkeypatch):
    """In process: a failure inside the model thread answers 500 with an error body; the next
    request is served."""
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    with in_process_service(tiny_qwen_dir, media, max_batch_size=2, max_wait_ms=0) as (llm, service):
        with TestClient(create_app(service), base_url="http://localhost") as http:
            original = llm.answer_batch
            monkeypatch.setattr(llm, "answer_batch", lambda *a, **k: 1 / 0)
            body = {"messages": video_message("clip0.mp4"), "max_tokens": 2}
            failed = http.post("/v1/chat/completions", json=body)
            assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
            monkeypatch.setattr(llm, "answer_batch", original)
            assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_requests_beyond_max_pending_are_503_until_the_model_answers(tiny_qwen_dir, media, monkeypatch):
    """With one request in progress and --max-pending 1, the next is refused with 503 and
    Retry-After; a client that goes away does not free its slot before the model has answered it,
    and once it has, requests are taken again."""
    import asyncio

    from fastapi.testclient import TestClient

    from aim_llava.serve import ApiError, create_app

    gate, entered = threading.Event(), threading.Event()
    body = {"messages": video_message("clip0.mp4"), "max_tokens": 2}
    raw = json.dumps(body).encode()
    with in_process_service(tiny_qwen_dir, media, max_batch_size=1, max_wait_ms=0, max_pending=1) as (llm, service):
        original = llm.answer_batch

        def held_answer_batch(*args, **kwargs):
            entered.set()
            assert gate.wait(timeout=60)
            return original(*args, **kwargs)

        monkeypatch.setattr(llm, "answer_batch", held_answer_batch)

        async def scenario():
            first = asyncio.create_task(service.complete(raw))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            busy = await asyncio.gather(asyncio.wait_for(service.complete(raw), 10), return_exceptions=True)
            first.cancel()  # the client goes away; the model is still working on its request
            await asyncio.sleep(0.05)
            still_busy = await asyncio.gather(asyncio.wait_for(service.complete(raw), 10), return_exceptions=True)
            gate.set()
            while service.pending:
                await asyncio.sleep(0.01)
            return busy[0], still_busy[0], await service.complete(raw)

        try:
            busy, still_busy, reply = asyncio.run(scenario())
            assert isinstance(busy, ApiError) and busy.status == 503 and busy.code == "server_busy"
            assert isinstance(still_busy, ApiError) and still_busy.status == 503
            assert reply["choices"][0]["message"]["content"] is not None and service.pending == 0
            gate.clear()
            entered.clear()
            with TestClient(create_app(service), base_url="http://localhost") as http:
                waiting = threading.Thread(target=http.post, args=("/v1/chat/completions",), kwargs={"json": body})
                waiting.start()
                assert entered.wait(timeout=60)
                refused = http.post("/v1/chat/completions", json=body)
                gate.set()
                waiting.join(timeout=60)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "server_busy"
        finally:
            gate.set()  # before the model thread is stopped


def test_a_client_that_leaves_stops_its_generation(tiny_qwen_dir, media, monkeypatch):
    """A streamed client that leaves after the first words, and a plain one that gives up after a
    second, each asked for 3,000 tokens with EOS disabled: the model ends both replies soon after
    (far short of the limit; the plain one may be dropped before its prefill), and the server is
    free again."""
    from aim_llava.serve import create_app

    body = {"messages": video_message("clip0.mp4"), "max_tokens": 3000}
    with in_process_service(tiny_qwen_dir, media, max_batch_size=1, max_wait_ms=0) as (llm, service):
        monkeypatch.setattr(llm.model.generation_defaults, "eos_token_ids", [])
        produced = record_new_tokens(llm, monkeypatch)

        def until_free():
            deadline = time.monotonic() + 120
            while service.pending and time.monotonic() < deadline:
                time.sleep(0.05)

        with serve_in_thread(create_app(service)) as port:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as response:
                for line in response.iter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        break  # the first words arrived: leave
            until_free()
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json=body, timeout=httpx.Timeout(120, read=1.0))
            until_free()
            assert len(produced) == 2 and all(count < 1500 for count in produced), produced
            assert service.pending == 0


def test_serve_refuses_a_missing_media_root(capsys, tiny_qwen_dir, tmp_path):
    assert main(["serve", "--model", str(tiny_qwen_dir), "--media-root", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_a_key_on_the_command_line_is_warned_about(capsys, tmp_path):
    """Other users of the machine read --api-key in ps: the server says to use the variable."""
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--media-root", str(tmp_path),
                 "--api-key", "k-secret"]) == 2
    err = capsys.readouterr().err
    assert "--api-key is visible to every user" in err and "$AIM_LLAVA_API_KEY" in err and "k-secret" not in err


def test_an_unexpected_warm_up_failure_is_one_line(monkeypatch, capsys, tiny_qwen_dir, media):
    import aim_llava.server.batching

    def failing(llm, frames):
        raise RuntimeError("kernel compilation failed\ndetails the user does not need")

    monkeypatch.setattr(aim_llava.server.batching, "warm_up", failing)
    code = main(["serve", "--model", str(tiny_qwen_dir), "--media-root", str(media), "--device", "cpu",
                 "--port", str(free_port())])
    error = without_dtype_note(capsys.readouterr().err).strip()
    assert code == 2 and "\n" not in error
    assert error == ("aim-llava: error: the warm-up request failed on cpu: RuntimeError: kernel compilation failed "
                     "(--no-warm-up starts the server without it)")
