"""aim-llava serve on a shared machine (issue 23): who may call it (API keys, the Host and Origin
headers, JSON bodies only), no unbounded work before a request is admitted, files opened once
under the media root, decoders limited to media, fair use of the model thread, and the server's
own health. Each test names what the server did before."""

import asyncio
import base64
import http.client
import io
import json
import os
import socket
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from conftest import (
    free_port,
    in_process_service,
    png_chunk,
    png_data_url,
    record_new_tokens,
    serve_in_thread,
    serve_process,
)
from PIL import Image

from aim_llava.cli import main
from aim_llava.sample_media import write_hls_playlist, write_sample_video

KEYS = ("k-one", "k-two", "k-three")


def video_body(url: str = "clip.mp4", **fields) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                      {"type": "text", "text": "What?"}]}], **fields}


def image_body(*urls: str, **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "What?"}]}], **fields}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening_media")
    write_sample_video(root / "clip.mp4", num_frames=12, fps=10)
    return root


@pytest.fixture(scope="module")
def shared(tiny_qwen_dir, media):
    """(VideoLLM, Service) in this process, for the tests that change nothing lasting in it."""
    with in_process_service(tiny_qwen_dir, media) as pair:
        yield pair


@pytest.fixture(scope="module")
def guarded(tiny_qwen_dir, media, tmp_path_factory):
    """A real server (started as ``python -m aim_llava.serve``) with two keys on the command line
    and one in the environment, one more host name, one web origin, at most 3 connections and 16
    tokens a request."""
    args = ["--model", tiny_qwen_dir, "--media-root", media, "--device", "cpu", "--frames", 2, "--max-new-tokens", 2,
            "--no-warm-up", "--served-model-name", "tiny", "--api-key", KEYS[0], "--api-key", KEYS[1],
            "--allowed-host", "api.example", "--allowed-origin", "https://app.example", "--max-connections", 3,
            "--max-tokens-limit", 16]
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    with serve_process(args, log, env={"AIM_LLAVA_API_KEY": KEYS[2]}, entry=("aim_llava.serve",)) as (base, _):
        yield base, int(base.rpartition(":")[2])


def refusing(what: str):
    """A stand-in that fails the request it is called for (an AssertionError: the server's
    threads survive it, as they would not survive pytest.fail)."""
    def called(*args, **kwargs):
        raise AssertionError(what)

    return called


def post(service, body: dict) -> httpx.Response:
    """A request through the server's HTTP layer, in this process."""
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    with TestClient(create_app(service), base_url="http://localhost") as http:
        return http.post("/v1/chat/completions", json=body)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def openai_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error["message"]


# ---------------------------------------------------------------------------- who may call


def test_every_v1_route_needs_one_of_the_keys(guarded):
    """Before, there were no keys: anyone who could reach the port could use the model."""
    base, _ = guarded
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/unknown")):
        for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": "Bearer"}):
            response = httpx.request(method, base + path, headers=headers, json=video_body())
            assert "API key" in openai_error(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
    for key in KEYS:  # two from --api-key, one from $AIM_LLAVA_API_KEY
        assert httpx.get(f"{base}/v1/models", headers=bearer(key)).json()["data"][0]["id"] == "tiny"
    reply = httpx.post(f"{base}/v1/chat/completions", headers=bearer(KEYS[2]), json=video_body(max_tokens=2),
                       timeout=120)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}  # probes need no key


def test_keys_are_compared_in_constant_time(monkeypatch):
    """Every key is compared, as equal-length digests, with hmac.compare_digest, whichever key
    (if any) matches."""
    import aim_llava.server.http as http

    compared = []
    original = http.hmac.compare_digest

    def recording(a, b):
        compared.append((len(a), len(b)))
        return original(a, b)

    monkeypatch.setattr(http.hmac, "compare_digest", recording)
    policy = http.AccessPolicy.for_address("127.0.0.1", KEYS)
    for header, valid in (("Bearer k-one", True), ("Bearer k-three", True), ("Bearer k-on", False), (None, False),
                          ("Bearer " + "x" * 10_000, False)):
        compared.clear()
        assert policy.key_valid(header) is valid
        assert compared == [(32, 32)] * len(KEYS)


def test_only_the_servers_own_host_names_are_answered(guarded):
    """DNS rebinding: a page on evil.example whose name is rebound to 127.0.0.1 sends
    Host: evil.example. Before, that was answered 200."""
    base, port = guarded
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.2", "localhost.evil.example"):
        response = httpx.get(f"{base}/v1/models", headers={**bearer(KEYS[0]), "Host": host})
        assert "does not answer to the host" in openai_error(response, 400, "invalid_host")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "api.example", f"api.example:{port}"):
        assert httpx.get(f"{base}/v1/models", headers={**bearer(KEYS[0]), "Host": host}).status_code == 200


def test_bodies_must_be_json(guarded):
    """A web page may post text/plain anywhere without asking (no CORS preflight): before, such
    a body was parsed and answered 200."""
    base, _ = guarded
    raw = json.dumps(video_body(max_tokens=1))
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {**bearer(KEYS[0]), **({"Content-Type": kind} if kind else {})}
        response = httpx.post(f"{base}/v1/chat/completions", content=raw, headers=headers)
        openai_error(response, 415, "unsupported_media_type")
    ok = httpx.post(f"{base}/v1/chat/completions", content=raw, timeout=120,
                    headers={**bearer(KEYS[0]), "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_cross_origin_requests_only_from_an_allowed_origin(guarded):
    base, _ = guarded
    evil = httpx.get(f"{base}/v1/models", headers={**bearer(KEYS[0]), "Origin": "https://evil.example"})
    openai_error(evil, 403, "origin_not_allowed")
    preflight = httpx.options(f"{base}/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    allowed = httpx.get(f"{base}/v1/models", headers={**bearer(KEYS[0]), "Origin": "https://app.example"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"


def test_no_cross_origin_access_by_default(shared):
    """Without --allowed-origin there is no CORS, and a browser's cross-origin request is refused
    (before, it ran: the browser only hid the answer from the page)."""
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    with TestClient(create_app(shared[1]), base_url="http://localhost") as http:
        plain = http.get("/v1/models")
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
        refused = http.get("/v1/models", headers={"Origin": "http://localhost:3000"})
        openai_error(refused, 403, "origin_not_allowed")
        preflight = http.options("/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


# ---------------------------------------------------------------------------- no unbounded work before admission


def test_connections_beyond_the_limit_are_refused(guarded):
    """uvicorn's limit_concurrency: with --max-connections 3, two idle connections and a request
    make three, and the request is answered 503 (before, no limit: idle connections piled up)."""
    base, port = guarded
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        time.sleep(0.2)  # the server has taken both connections
        assert httpx.get(f"{base}/health").status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(f"{base}/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_body_that_does_not_arrive_in_time_is_408(tiny_qwen_dir, media):
    """A client that sends headers and then trickles (or stops sending) its body holds a
    connection and a task: the body must arrive within body_timeout_s (before, it waited forever)."""
    from aim_llava.serve import ServerLimits, create_app

    limits = ServerLimits(body_timeout_s=0.5)
    with in_process_service(tiny_qwen_dir, media, limits=limits) as (_, service):
        with serve_in_thread(create_app(service)) as port:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\"")
                reply = http.client.HTTPResponse(sock)
                reply.begin()
                body = json.loads(reply.read())
    assert reply.status == 408 and body["error"]["code"] == "timeout", body


def test_bodies_declared_large_and_not_sent_hold_no_more_than_the_budget(tiny_qwen_dir, media):
    """Eight connections each declaring a 4 MiB body and sending 1 KiB, against a budget of two
    bodies (8 MiB): the memory the server allocates stays far below the budget (before, each
    buffer was allocated, zeroed, at its declared length: 32 MiB, and 128 connections declaring
    64 MiB held 8 GiB)."""
    import tracemalloc

    from aim_llava.serve import ServerLimits, create_app

    declared, sent, connections = 4 * 2**20, 1024, 8
    limits = ServerLimits(max_body_bytes=declared)
    with in_process_service(tiny_qwen_dir, media, limits=limits, max_pending=2) as (_, service):
        budget = service.bodies.limit
        with serve_in_thread(create_app(service)) as port:
            tracemalloc.start()
            sockets = []
            try:
                before = tracemalloc.get_traced_memory()[0]
                for _ in range(connections):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                    sockets.append(sock)
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % declared
                                 + b" " * sent)
                deadline = time.monotonic() + 30
                while service.bodies.held < connections * sent:
                    assert time.monotonic() < deadline, service.bodies.held
                    time.sleep(0.02)
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
                for sock in sockets:
                    sock.close()
    assert budget == 2 * declared
    assert grown < budget / 4, f"{connections} bodies of {sent} bytes received made the server allocate {grown:,} bytes"


def test_json_and_media_paths_are_handled_off_the_event_loop(shared, media, monkeypatch):
    """Parsing a body of up to 64 MB and resolving media paths (stat calls that may block on a
    network file system) run in worker threads; before, both ran on the event loop, which then
    answered nobody else."""
    from aim_llava.serve import create_app

    loop_thread = threading.get_ident()
    on_the_loop, recording_now = [], []

    def recording(function, name):
        def wrapper(*args, **kwargs):
            if recording_now and threading.get_ident() == loop_thread and (
                    name == "json.loads" or media.name in str(args[:1]) or "clip.mp4" in str(args[:1])):
                on_the_loop.append((name, args[:1]))
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(json, "loads", recording(json.loads, "json.loads"))
    for name in ("stat", "lstat", "open", "readlink", "scandir"):
        monkeypatch.setattr(os, name, recording(getattr(os, name), f"os.{name}"))

    async def scenario(service):
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=120) as client:
            recording_now.append(True)
            return await client.post("/v1/chat/completions", json=video_body(max_tokens=1))

    response = asyncio.run(scenario(shared[1]))
    assert response.status_code == 200, response.text
    assert on_the_loop == []


def test_a_body_is_not_read_while_the_server_is_full(tiny_qwen_dir, media, monkeypatch):
    """With --max-pending 1 and one request at the model, the next is refused 503 without its body
    being read (before, up to 64 MiB were read and parsed first: --max-pending bounded nothing
    of that)."""
    from aim_llava.serve import ApiError

    with in_process_service(tiny_qwen_dir, media, max_batch_size=1, max_wait_ms=0, max_pending=1) as (llm, service):
        gate, entered = held_model(llm, monkeypatch)
        raw, read = json.dumps(video_body(max_tokens=1)).encode(), []

        async def body(budget) -> bytes:
            read.append(True)
            return raw

        async def scenario():
            first = asyncio.create_task(service.complete(body))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            refused = await asyncio.gather(service.complete(body), return_exceptions=True)
            gate.set()
            await first
            await settled(service)
            return refused[0]

        try:
            refused = asyncio.run(scenario())
        finally:
            gate.set()
    assert isinstance(refused, ApiError) and refused.status == 503 and refused.code == "server_busy"
    assert read == [True] and service.pending == 0


def test_a_body_of_many_json_values_is_refused_before_parsing(shared, monkeypatch):
    """A 64 MiB body of empty objects made ~25 times its size in Python objects, parsed while
    holding the GIL; the body's brackets and commas are now counted first."""
    parsed, loads = [], json.loads
    monkeypatch.setattr(json, "loads", lambda text, **kwargs: parsed.append(len(text)) or loads(text, **kwargs))
    limit = shared[1].limits.max_json_punctuation
    for padding in ([{}] * limit, ["ab"] * limit):
        refused = post(shared[1], video_body(metadata=padding))
        assert f"at most {limit:,}" in openai_error(refused, 400, "too_many_values")
    assert parsed and max(parsed) < 1000  # the error replies only, read by the test


def test_the_largest_admissible_request_fits_the_punctuation_bound():
    """The count is no refusal of a request within the limits: every message and content part
    at its count, all text made of brackets and commas, every other field given."""
    from aim_llava.serve import ServerLimits

    limits = ServerLimits(max_messages=5, max_content_parts=12, max_text_chars=600)
    parts_each = [3, 2, 3, 2, 2]
    texts = iter(["{[," * 20] * limits.max_content_parts)
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "name": "x",
                 "content": [{"type": "image_url", "image_url": {"url": "a.png", "detail": "auto"}}]
                 + [{"type": "text", "text": next(texts)} for _ in range(count - 1)]}
                for i, count in enumerate(parts_each)]
    body = {**video_body(), "messages": messages, "stop": ["{", "[", ",", "]"], "stream_options": {"include_usage": True},
            "logit_bias": {}, "tools": [], "functions": [], "response_format": {"type": "text"}, "modalities": ["text"],
            "metadata": {"a": "b"}, "max_tokens": 1, "temperature": 0, "top_p": 1, "seed": 1, "n": 1, "stream": False,
            "frames": 2, "fps": 1, "max_frames": 2, "config": "aim_default", "user": "u", "logprobs": False}
    raw = json.dumps(body).encode()
    assert sum(len(t) for m in messages for p in m["content"] for t in [p.get("text", "")]) <= limits.max_text_chars
    assert raw.count(b"{") + raw.count(b"[") + raw.count(b",") <= limits.max_json_punctuation


@pytest.mark.parametrize("messages, words", [
    # 2000 empty turns: a 60,000-token prompt built and tokenized in the model thread, before
    ([{"role": "user" if i % 2 == 0 else "assistant", "content": ""} for i in range(1999)], "messages; the server"),
    # just under the text limit, but each message adds the template's characters
    ([{"role": "user" if i % 2 == 0 else "assistant", "content": "w" * 1040} for i in range(1001)],
     "characters of text (with 32 for each message's template)"),
])
def test_messages_are_counted_with_their_template(shared, monkeypatch, messages, words):
    llm, service = shared
    messages[0]["content"] = [{"type": "video_url", "video_url": "clip.mp4"}]
    monkeypatch.setattr(llm, "answer_batch", refusing("the model was asked"))
    response = post(service, {"messages": messages})
    assert words in openai_error(response, 413, "too_large")


@pytest.mark.parametrize("body, status", [
    ({**video_body(), "model": "m" * 1_000_000}, 404),
    ({**video_body(), "config": "c" * 1_000_000}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "t" * 1_000_000}]}]}, 400),
    (video_body("s" * 1_000_000 + "://x"), 400),
    (video_body("n" * 200 + "/" + "b" * 1_000_000), 400),
    (image_body("data:image/" + "x" * 1_000_000 + ";base64,AAAA"), 400),
])
def test_echoed_fields_are_cut_before_they_are_escaped(shared, body, status):
    """Before, a megabyte-long field came back whole in the error message (escaped character by
    character on the event loop)."""
    response = post(shared[1], body)
    assert response.status_code == status, response.text[:300]
    assert len(response.json()["error"]["message"]) < 400


# ---------------------------------------------------------------------------- files opened once


@pytest.fixture
def swap_media(tmp_path):
    """A media root whose folder d/ holds red media, and an outside folder d/ holding blue ones;
    swap() replaces the root's d/ by a link to the outside one."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder, colour in ((root, (250, 0, 0)), (outside, (0, 0, 250))):
        (folder / "d" / "frames").mkdir(parents=True)
        Image.new("RGB", (48, 32), colour).save(folder / "d" / "pic.png")
        for i in range(2):
            Image.new("RGB", (48, 32), colour).save(folder / "d" / "frames" / f"{i}.png")
        frames = [av_frame(colour)] * 6
        write_frames_video(folder / "d" / "clip.mp4", frames)

    def swap():
        (root / "d").rename(tmp_path / "moved")
        (root / "d").symlink_to(outside / "d")

    return root, swap


def av_frame(colour) -> np.ndarray:
    return np.full((32, 48, 3), colour, dtype=np.uint8)


def write_frames_video(path, frames) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=6)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("kind, url", [("image_url", "d/pic.png"), ("video_url", "d/clip.mp4"),
                                       ("video_url", "d/frames")])
def test_a_directory_swapped_for_a_link_reads_nothing_outside(tiny_qwen_dir, swap_media, monkeypatch, kind, url):
    """The path check and the open are one operation: the root's d/ is replaced by a link to an
    outside folder after the server opened the path and before the decoding process reads it,
    and the decoder still reads the red file it was handed (before, the path was checked, then
    opened again by name: blue)."""
    from aim_llava.server.decoding import DecodingProcess

    root, swap = swap_media
    original = DecodingProcess.ask

    def swapping(*args, **kwargs):
        if not (root / "d").is_symlink():
            swap()
        return original(*args, **kwargs)

    monkeypatch.setattr(DecodingProcess, "ask", swapping)
    body = {"messages": [{"role": "user", "content": [{"type": kind, kind: {"url": url}}]}], "max_tokens": 1}
    with in_process_service(tiny_qwen_dir, root) as (llm, service):
        seen = []
        answer = llm.answer_batch
        monkeypatch.setattr(llm, "answer_batch", lambda items, *a: seen.extend(c for _, c in items) or answer(items, *a))
        reply = post(service, body)
    assert (root / "d").is_symlink() and reply.status_code == 200, reply.text
    red, _, blue = seen[0].frames.reshape(-1, 3).mean(axis=0)
    assert red > 200 and blue < 50, (red, blue)
    # a video's frames arrive at the model's input size; a single image at its own, for the tiling
    assert seen[0].frames.shape[1:] == ((32, 48, 3) if kind == "image_url" else (384, 384, 3))


def test_frame_directories_are_served_and_their_links_not_followed(tiny_qwen_dir, tmp_path):
    """A frame directory is listed through the handle that was checked, and each frame opened
    without following a link (before, directories were not served at all)."""
    root = tmp_path / "root"
    (root / "frames").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (48, 32), (10 * i, 0, 0)).save(root / "frames" / f"{i}.png")
    Image.new("RGB", (48, 32)).save(tmp_path / "secret.png")
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": "frames"}]}], "max_tokens": 1}
    with in_process_service(tiny_qwen_dir, root) as (_, service):
        reply = post(service, body)
        assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] > 2 * 196, reply.text
        (root / "frames" / "3.png").symlink_to(tmp_path / "secret.png")
        refused = openai_error(post(service, {**body, "frames": 4}), 400, "unreadable_media")
    assert "cannot open the frame 3.png" in refused and str(tmp_path) not in refused


# ---------------------------------------------------------------------------- decoders limited to media


def test_a_nul_reaching_the_walk_is_a_400(tmp_path):
    """The walk's last line of defence: os.open raises ValueError for a NUL (before, a 500)."""
    from aim_llava.server.errors import ApiError
    from aim_llava.server.media import FileMedia, MediaRoot

    root = MediaRoot(tmp_path)
    try:
        with pytest.raises(ApiError) as refused:
            root.open(FileMedia("a.mp4", "a\x00b.mp4", "messages[0]"))
    finally:
        root.close()
    assert refused.value.status == 400 and "not a valid file name" in refused.value.message


def test_a_video_is_routed_by_the_path_opened_not_the_urls_query(shared, media):
    """A file:// URL whose query ends in .png named a video that was handed to Pillow (a 400)."""
    response = post(shared[1], video_body(f"file://{media}/clip.mp4?x.png", max_tokens=1))
    assert response.status_code == 200, response.text


def eps_bytes() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\n%%EOF\n"


def data_url(kind: str, raw: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(raw).decode()}"


def encoded(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def png_with_text_bomb() -> bytes:
    """A PNG with a zTXt chunk that inflates to 2 MB: Pillow raises ValueError, not OSError."""
    png = encoded(Image.new("RGB", (8, 8)), "PNG")
    return png[:33] + png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * (2 << 20))) + png[33:]


@pytest.mark.parametrize("name, url, words", [
    ("EPS inline, declared as PNG", data_url("image/png", eps_bytes()), "formats read here: PNG"),
    ("EPS in a .png file", "drawing.png", "formats read here: JPEG, PNG"),
    ("a JPEG declared as PNG", data_url("image/png", encoded(Image.new("RGB", (8, 8)), "JPEG")), "formats read here: PNG"),
    ("a PNG whose text chunk inflates to 2 MB", data_url("image/png", png_with_text_bomb()), "ValueError"),
    ("an HLS playlist naming a file outside the root", "playlist.mp4", "cannot decode playlist.mp4"),
])
def test_only_media_decoders_read_what_clients_send(tiny_qwen_dir, tmp_path, monkeypatch, name, url, words):
    """Before: EPS reached Ghostscript (Pillow picks the decoder from the content), a JPEG sent
    as image/png was decoded, the text bomb was a 500, and decord read the outside file named by
    the playlist (200)."""
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", refusing("Ghostscript ran"))
    root = tmp_path / "root"
    root.mkdir()
    (root / "drawing.png").write_bytes(eps_bytes())
    secret = write_sample_video(tmp_path / "outside" / "secret.ts", num_frames=30, fps=10)
    write_hls_playlist(root / "playlist.mp4", secret, 3.0)  # decord follows it: read before (200)
    kind = "video_url" if url.endswith(".mp4") else "image_url"
    body = {"messages": [{"role": "user", "content": [{"type": kind, kind: {"url": url}}]}], "max_tokens": 1}
    with in_process_service(tiny_qwen_dir, root) as (_, service):
        refused = openai_error(post(service, body), 400, "unreadable_media")
    assert words in refused and str(tmp_path) not in refused


# ---------------------------------------------------------------------------- fair use of the model thread


def test_max_tokens_is_bounded_by_the_servers_limit(guarded):
    base, _ = guarded
    over = httpx.post(f"{base}/v1/chat/completions", headers=bearer(KEYS[0]), json=video_body(max_tokens=17))
    assert "'max_tokens' must lie in [1, 16]" in openai_error(over, 400, "invalid_request")
    ok = httpx.post(f"{base}/v1/chat/completions", headers=bearer(KEYS[0]), json=video_body(max_tokens=16), timeout=120)
    assert ok.status_code == 200


def test_a_request_past_its_deadline_is_ended(tiny_qwen_dir, media, monkeypatch):
    """3,000 tokens with EOS disabled and a 2-second deadline: a 504, and the model stopped soon
    after the deadline (before, the model decoded all 3,000 tokens)."""
    from aim_llava.serve import ApiError, ServerLimits

    with in_process_service(tiny_qwen_dir, media, limits=ServerLimits(request_timeout_s=2)) as (llm, service):
        monkeypatch.setattr(llm.model.generation_defaults, "eos_token_ids", [])
        produced = record_new_tokens(llm, monkeypatch)

        async def scenario():
            late = await asyncio.gather(service.complete(json.dumps(video_body(max_tokens=3000)).encode()),
                                        return_exceptions=True)
            await settled(service)
            return late[0]

        late = asyncio.run(scenario())
    assert isinstance(late, ApiError) and late.status == 504 and late.code == "timeout"
    assert len(produced) == 1 and produced[0] < 1500, produced


def test_a_job_past_its_deadline_is_cancelled_before_the_event_loop_notices():
    """The model asks job.cancelled() before encoding, before prefill and at each step; it read
    only `abandoned`, which the event loop sets when it gets round to it."""
    from aim_llava.server.batching import Job

    now = time.monotonic()
    assert Job(None, None, deadline=now - 0.001).cancelled()
    assert not Job(None, None, deadline=now + 60).cancelled()
    assert Job(None, None, deadline=now + 60, abandoned=True).cancelled()


def test_a_reply_the_model_cut_at_its_deadline_is_a_504_not_a_short_answer(tiny_qwen_dir, media):
    """When the model stops decoding because the deadline passed before the event loop's timer
    fires, the reply it hands back is a cut one: the client gets the timeout, not a 200 with a
    truncated text (the end-to-end test above could see either order)."""
    from aim_llava.pipeline import Request, Result
    from aim_llava.serve import ApiError
    from aim_llava.server.batching import Job

    with in_process_service(tiny_qwen_dir, media) as (_, service):
        async def scenario():
            loop = asyncio.get_running_loop()
            job = Job(None, loop, deadline=time.monotonic() - 0.001)
            job.done = loop.create_future()
            service.worker.hand_back(job, Result(Request("clip.mp4")))
            return job, await job.done

        job, (result, completion) = asyncio.run(scenario())
        with pytest.raises(ApiError) as late:
            service.reply(job, result, completion)
    assert late.value.status == 504 and late.value.code == "timeout"


def test_media_still_being_read_at_the_deadline_is_504(tiny_qwen_dir, media):
    """Reading stops at the request's deadline too (a video whose frames take long to seek, many
    large images)."""
    from aim_llava.serve import ServerLimits

    with in_process_service(tiny_qwen_dir, media, limits=ServerLimits(request_timeout_s=1e-6)) as (_, service):
        for body in (video_body(), image_body(png_data_url(8, 8), png_data_url(8, 8))):
            late = post(service, body)
            assert "took longer than the request's time limit" in openai_error(late, 504, "timeout")


async def settled(service) -> None:
    """Returns once the model has handed every job back (to this event loop)."""
    while service.pending:
        await asyncio.sleep(0.05)


def held_model(llm, monkeypatch):
    """(gate, entered): the model thread waits at ``gate`` when it starts a batch."""
    gate, entered, original = threading.Event(), threading.Event(), llm.answer_batch

    def held(*args, **kwargs):
        entered.set()
        assert gate.wait(timeout=60)
        return original(*args, **kwargs)

    monkeypatch.setattr(llm, "answer_batch", held)
    return gate, entered


def test_a_client_gone_while_queued_is_never_encoded(tiny_qwen_dir, media, monkeypatch):
    """Before, a request whose client left while it waited was still encoded and prefilled; only
    the decoding loop looked at the client."""
    with in_process_service(tiny_qwen_dir, media, max_batch_size=1, max_wait_ms=0) as (llm, service):
        encoded_clips, encode = [], llm.encode_clips
        monkeypatch.setattr(llm, "encode_clips", lambda clips, config: encoded_clips.extend(clips) or encode(clips, config))
        gate, entered = held_model(llm, monkeypatch)
        raw = json.dumps(video_body(max_tokens=2)).encode()

        async def scenario():
            gone = asyncio.Event()
            first = asyncio.create_task(service.complete(raw))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            second = asyncio.create_task(service.complete(raw, gone.wait))
            while service.pending < 2:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the second request's frames are read and it waits for the model
            gone.set()
            await asyncio.sleep(0.05)
            gate.set()
            answered, dropped = await first, await asyncio.gather(second, return_exceptions=True)
            await settled(service)
            return answered, dropped[0]

        try:
            first, second = asyncio.run(scenario())
        finally:
            gate.set()
    assert second.status == 499
    assert first["choices"][0]["message"]["role"] == "assistant"
    assert len(encoded_clips) == 1


def test_a_client_gone_during_encoding_is_not_prefilled(tiny_qwen_dir, media, monkeypatch):
    with in_process_service(tiny_qwen_dir, media, max_batch_size=1, max_wait_ms=0) as (llm, service):
        encode, respond, responded = llm.encode_clips, llm.respond_many, []
        monkeypatch.setattr(llm, "respond_many", lambda *a, **k: responded.append(1) or respond(*a, **k))

        async def scenario():
            loop, gone = asyncio.get_running_loop(), asyncio.Event()

            def encode_then_leave(clips, config):
                visuals = encode(clips, config)
                loop.call_soon_threadsafe(gone.set)  # the client leaves while its video is encoded
                time.sleep(0.2)
                return visuals

            monkeypatch.setattr(llm, "encode_clips", encode_then_leave)
            gone_client = await asyncio.gather(service.complete(json.dumps(video_body()).encode(), gone.wait),
                                               return_exceptions=True)
            await settled(service)
            return gone_client[0]

        assert asyncio.run(scenario()).status == 499
    assert responded == []


def test_a_batch_answered_again_one_by_one_streams_each_text_once(tiny_qwen_dir, media, monkeypatch):
    """Two streamed requests generated together; the batch fails after streaming its first
    tokens, and each request is answered again alone. Before, the client got the first tokens,
    then the whole text again."""
    with in_process_service(tiny_qwen_dir, media, max_batch_size=2, max_wait_ms=2000) as (llm, service):
        respond = llm.respond_many

        def failing_in_batches(visuals, *args, **kwargs):
            responses = respond(visuals, *args, **kwargs)
            if len(visuals) > 1:
                raise RuntimeError("out of memory in the middle of a batch")
            return responses

        monkeypatch.setattr(llm, "respond_many", failing_in_batches)

        async def streamed(question):
            body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": "clip.mp4"},
                                                              {"type": "text", "text": question}]}],
                    "max_tokens": 6, "stream": True}
            events = await service.complete(json.dumps(body).encode())
            text = ""
            async for event in events:
                payload = event.removeprefix("data: ").strip()
                if payload != "[DONE]":
                    text += "".join(choice["delta"].get("content") or "" for choice in json.loads(payload)["choices"])
            return text

        async def plain(question):
            body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": "clip.mp4"},
                                                              {"type": "text", "text": question}]}], "max_tokens": 6}
            return (await service.complete(json.dumps(body).encode()))["choices"][0]["message"]["content"]

        async def scenario():
            texts = await asyncio.gather(streamed("What?"), streamed("Where?"))
            return texts, [await plain("What?"), await plain("Where?")]

        texts, alone = asyncio.run(scenario())
    assert texts == alone and all(texts)


# ---------------------------------------------------------------------------- the small ones


def test_health_reports_a_stopped_model_thread(tiny_qwen_dir, media):
    """Before, /health said ok while requests waited forever for a model thread that had died."""
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    with in_process_service(tiny_qwen_dir, media) as (_, service):
        with TestClient(create_app(service), base_url="http://localhost") as http:
            assert http.get("/health").status_code == 200
            service.worker.stop()
            health = http.get("/health")
            assert health.status_code == 503 and "model thread" in health.json()["reason"]
            refused = http.post("/v1/chat/completions", json=video_body())
            assert refused.status_code == 503 and "model thread" in refused.json()["error"]["message"]


def test_health_reports_stopped_media_decoders(tiny_qwen_dir, media):
    """The fork server of the decoding processes ending (killed by an operator, out of memory) is
    a 503 in /health and for requests with media, not a 400 blaming the client's media; a chat
    without media is still answered."""
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    with in_process_service(tiny_qwen_dir, media) as (_, service):
        with TestClient(create_app(service), base_url="http://localhost") as http:
            service.readers.forks.process.kill()
            service.readers.forks.process.wait()
            health = http.get("/health")
            refused = http.post("/v1/chat/completions", json=video_body(max_tokens=1))
            text = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 1})
    assert health.status_code == 503 and health.json()["status"] == "error"
    assert "media decoders have stopped" in openai_error(refused, 503, "server_error")
    assert text.status_code == 200


def test_native_stderr_is_not_silenced_while_the_server_runs(tiny_qwen_dir, media, monkeypatch, capfd):
    """What native code writes to stderr while the server runs (a CUDA error, a crash) reaches
    the operator; before, it went to /dev/null for the server's lifetime."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: os.write(2, b"native message from C\n"))
    assert main(["serve", "--model", str(tiny_qwen_dir), "--media-root", str(media), "--device", "cpu",
                 "--no-warm-up", "--port", str(free_port()), "--host", "0.0.0.0"]) == 0
    err = capfd.readouterr().err
    assert "native message from C" in err
    assert "0.0.0.0 is reachable from other machines and no --api-key is set" in err


def test_the_tokenizer_is_used_by_the_model_thread_only(shared, monkeypatch):
    """Fast tokenizers are not safe to share between threads; before, a reply cut at a stop
    sequence had its tokens counted on the event loop while the model thread tokenized."""
    threads = set()

    class Recording:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, *args, **kwargs):
            threads.add(threading.current_thread().name)
            return self.tokenizer(*args, **kwargs)

        def __getattr__(self, name):
            value = getattr(self.tokenizer, name)
            if callable(value):
                def recorded(*args, **kwargs):
                    threads.add(threading.current_thread().name)
                    return value(*args, **kwargs)

                return recorded
            return value

    llm, service = shared
    full = post(service, video_body(max_tokens=8)).json()["choices"][0]["message"]["content"]
    monkeypatch.setattr(llm, "tokenizer", Recording(llm.tokenizer))
    cut = post(service, video_body(max_tokens=8, stop=[full[2:4]])).json()
    assert cut["choices"][0]["message"]["content"] == full[: full.index(full[2:4])]
    assert threads == {"aim-llava-model"}


def test_a_large_image_among_frames_is_held_at_the_models_input_size(shared, monkeypatch):
    """Several images are frames: each is brought to 384x384 when decoded (before, every later
    image was upscaled to the first one's size, 7000x7000 for a 1x1 PNG)."""
    llm, service = shared
    seen, answer = [], llm.answer_batch
    monkeypatch.setattr(llm, "answer_batch", lambda items, *a: seen.extend(c for _, c in items) or answer(items, *a))
    body = image_body(png_data_url(1200, 900, (9, 9, 9)), png_data_url(1, 1), max_tokens=1)
    assert post(service, body).status_code == 200
    assert seen[0].frames.shape == (2, 384, 384, 3)


# ---------------------------------------------------------------------------- the low findings of issue 40


@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_a_lone_surrogate_in_any_message_is_a_400(shared, role):
    """A JSON "\\ud800" escape makes a string the tokenizer cannot encode: in the user's text it
    was a 400 from the model thread, in the system message a 500 with a 33-line traceback. Now
    every message's text is checked with the request."""
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": "clip.mp4"},
                                             {"type": "text", "text": "What?"}]}]
    if role == "system":
        messages.insert(0, {"role": "system", "content": "Be brief \ud800."})
    else:
        messages += [{"role": "assistant", "content": "A clip."}, {"role": "user", "content": "And?"}]
        messages[0 if role == "user" else 1]["content"] = (
            [messages[0]["content"][0], {"type": "text", "text": "What \ud800?"}] if role == "user" else "A \ud800.")
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    with TestClient(create_app(shared[1]), base_url="http://localhost") as http:  # the escape as JSON has it
        response = http.post("/v1/chat/completions", content=json.dumps({"messages": messages, "max_tokens": 1}),
                             headers={"Content-Type": "application/json"})
    assert "is not valid UTF-8 text (character" in openai_error(response, 400, "invalid_request")


@pytest.mark.parametrize("url", ["clip.mp4/", "clip.mp4/.", "./clip.mp4//", "clip.mp4/..", "clip.mp4/./"])
def test_a_name_after_a_file_is_not_found(shared, url):
    """The walk skipped empty and "." components, so clip.mp4/. and clip.mp4/ were served where
    the kernel says ENOTDIR."""
    assert "not found" in openai_error(post(shared[1], video_body(url, max_tokens=1)), 404, "media_not_found")


@pytest.mark.parametrize("host", ["[::1]evil.example", "[::1]:80evil.example", "[::1", "::1"])
def test_a_host_must_be_a_name_or_bracketed_address_with_at_most_a_port(guarded, host):
    """Host: [::1]evil.example was answered: the name was taken as what stood in the brackets."""
    base, _ = guarded
    response = httpx.get(f"{base}/v1/models", headers={**bearer(KEYS[0]), "Host": host})
    assert "does not answer to the host" in openai_error(response, 400, "invalid_host")


def test_bracketed_local_addresses_are_answered(guarded):
    """The strict Host check still takes what browsers send for an IPv6 address."""
    base, port = guarded
    for host in ("[::1]", f"[::1]:{port}", "[::1]:80"):
        response = httpx.get(f"{base}/v1/models", headers={**bearer(KEYS[0]), "Host": host})
        assert response.status_code == 200, (host, response.text)


def test_a_request_framed_two_ways_is_refused(guarded):
    """A body sent with both Transfer-Encoding: chunked and Content-Length was accepted (a proxy
    in front that reads it the other way lets a second request through unseen)."""
    base, port = guarded
    body = json.dumps(video_body(max_tokens=1)).encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEYS[0]}\r\nTransfer-Encoding: chunked\r\n".encode()
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + chunked)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        error = json.loads(reply.read())["error"]
    assert reply.status == 400 and error["code"] == "invalid_framing", error


def test_an_allowed_origin_is_matched_as_browsers_send_it(guarded):
    """https://app.example/ passed the origin check (compared without its slash) but got no CORS
    header (CORS compares exactly): a request the page could not read, run anyway."""
    base, _ = guarded
    slashed = httpx.get(f"{base}/v1/models", headers={**bearer(KEYS[0]), "Origin": "https://app.example/"})
    openai_error(slashed, 403, "origin_not_allowed")
    exact = httpx.get(f"{base}/v1/models", headers={**bearer(KEYS[0]), "Origin": "https://app.example"})
    assert exact.status_code == 200 and exact.headers["access-control-allow-origin"] == "https://app.example"


def test_a_file_of_several_hard_links_is_not_served(tiny_qwen_dir, tmp_path):
    """A hard link in the media root to a file outside it was served: a link that is no symbolic
    link, which the walk cannot see. Files (and frames) of more than one link are now refused."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "frames").mkdir(parents=True)
    outside.mkdir()
    write_sample_video(outside / "secret.mp4", num_frames=6, fps=6)
    Image.new("RGB", (48, 32)).save(outside / "secret.png")
    os.link(outside / "secret.mp4", root / "linked.mp4")
    os.link(outside / "secret.png", root / "frames" / "0.png")
    Image.new("RGB", (48, 32)).save(root / "frames" / "1.png")
    with in_process_service(tiny_qwen_dir, root) as (_, service):
        video = openai_error(post(service, video_body("linked.mp4", max_tokens=1)), 403, "hard_link")
        frames = openai_error(post(service, video_body("frames", max_tokens=1)), 400, "unreadable_media")
        os.unlink(outside / "secret.mp4")  # now the root's is its only link
        served = post(service, video_body("linked.mp4", max_tokens=1))
    assert "has 2 hard links" in video and "the frame 0.png has 2 hard links" in frames
    assert served.status_code == 200, served.text


def test_slow_bodies_do_not_fill_max_pending(tiny_qwen_dir, media):
    """32 clients that sent headers and trickled their bodies held every --max-pending slot for
    30 s, so everyone else got 503. Bodies being read now take bytes from a budget shared by all
    (max_pending full bodies), not slots: slow clients hold what they sent, and a body that would
    take the budget past its end is refused."""
    from aim_llava.serve import ServerLimits, create_app

    limits = ServerLimits(max_body_bytes=2**20)  # max_pending 2: a budget of 2 MiB
    with in_process_service(tiny_qwen_dir, media, max_pending=2, limits=limits) as (_, service):
        with serve_in_thread(create_app(service)) as port:
            def trickle(sent: bytes, declared: int) -> socket.socket:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             + f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n".encode() + sent)
                return sock

            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            slow = [trickle(b'{"messages"', 1000) for _ in range(8)]
            time.sleep(0.5)
            answered = httpx.post(url, json=video_body(max_tokens=1), timeout=120)
            big = [trickle(b" " * 900_000, 2**20) for _ in range(2)]  # 1.8 MiB held of the 2 MiB
            deadline = time.monotonic() + 10
            while service.bodies.held < 1_800_000 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = httpx.post(url, content=json.dumps(video_body(max_tokens=1, user="u" * 300_000)),
                                 headers={"Content-Type": "application/json"}, timeout=120)
            for sock in slow + big:
                sock.close()
            while service.bodies.held and time.monotonic() < deadline + 10:
                time.sleep(0.05)
            again = httpx.post(url, json=video_body(max_tokens=1), timeout=120)
    assert answered.status_code == 200, answered.text
    assert "request bodies" in openai_error(refused, 503, "server_busy")
    assert again.status_code == 200 and service.bodies.held == 0
