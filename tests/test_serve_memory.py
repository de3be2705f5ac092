"""Peak memory of a real ``aim-llava serve`` process (tiny checkpoint, CPU, 127.0.0.1) under the
hostile requests of issue 23: one request's media are held at the model's input size, within the
request's pixel budget, whatever their size at the source.

The growth is measured as the process's peak resident set (``VmHWM`` in /proc/PID/status, reset
to the current size through /proc/PID/clear_refs before each request) minus its size before.
On the CPU the model's own working memory (float pixels of every frame, the vision tower's
activations) is host memory too and is part of what is measured; the bounds leave room for it.
The server runs under an address-space limit, so that a regression fails the test with an error
instead of taking the shared machine's memory.
"""

import json
import resource

import httpx
import pytest
from conftest import peak_growth_mib, png_data_url, serve_process

from aim_llava.sample_media import write_sample_video

MIB = 2**20
ADDRESS_SPACE_LIMIT = 7 * 2**30  # the idle server maps ~4 GB (CPU torch); a regression fails here, not the machine


@pytest.fixture(scope="module")
def served(tiny_qwen_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_media")
    write_sample_video(root / "hd.mp4", num_frames=30, fps=15, height=720, width=1280, gop=30)
    log = root.parent / "memory_server.log"

    def limit_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))

    args = ["--model", tiny_qwen_dir, "--media-root", root, "--device", "cpu", "--frames", 4, "--max-new-tokens", 1,
            "--no-warm-up", "--served-model-name", "tiny"]
    with serve_process(args, log, preexec_fn=limit_address_space) as (base, process):
        yield base, process.pid, log


def ask(base: str, content: list[dict], **fields) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content + [{"type": "text", "text": "What?"}]}], "max_tokens": 1,
            **fields}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_huge_image_among_frames_is_held_at_the_models_input_size(served):
    """Today every later image was upscaled to the first one's size before any budget applied: a
    7000x7000 PNG followed by ten 1x1 PNGs grew the server by 8 GB. Now each image is brought to
    384x384 as it is decoded: what remains is one decoded 7000x7000 image at a time (~190 MB in
    Pillow) and the model's work on eleven small frames (~200 MB measured; the old code fails
    with a MemoryError under this test's address-space limit)."""
    base, pid, log = served
    warm, _ = peak_growth_mib(pid, lambda: ask(base, [image(png_data_url(8, 8))] * 2))  # first use of every path
    big, tiny = png_data_url(7000, 7000, (10, 200, 30)), png_data_url(1, 1, (200, 10, 30))
    growth, response = peak_growth_mib(pid, lambda: ask(base, [image(big)] + [image(tiny)] * 10))
    assert response.status_code == 200, (response.text, log.read_text()[-2000:])
    assert growth < 600, f"the server's memory grew by {growth:.0f} MiB (after {warm:.0f} MiB for a warm-up)"


def test_many_frames_of_a_large_clip_are_decoded_at_the_models_input_size(served):
    """Today frames were decoded at full size with no pixel budget: 600 frames of a 1280x720
    clip with aim_merge1 (4 tokens a frame, so only the context bounds the frames) grew the
    server by 9.9 GB, and 64 frames by over 1 GB (measured: the old code then fails under this
    test's address-space limit). Now each frame is brought to 384x384 as it is decoded (64 of
    them hold 28 MB; the model's float pixels on the CPU are most of the ~400 MB measured) and
    the request's pixel budget counts frames before decoding."""
    base, pid, log = served
    video = {"type": "video_url", "video_url": {"url": "hd.mp4"}}
    warm, _ = peak_growth_mib(pid, lambda: ask(base, [video], frames=4, config="aim_merge1"))
    growth, response = peak_growth_mib(pid, lambda: ask(base, [video], frames=64, config="aim_merge1"))
    assert response.status_code == 200, (response.text, log.read_text()[-2000:])
    assert growth < 800, f"the server's memory grew by {growth:.0f} MiB (after {warm:.0f} MiB for a warm-up)"
    over = ask(base, [video], frames=1000, config="aim_merge1")  # 1000 x 384 x 384 > 2**27: refused before decoding
    assert over.status_code == 400 and "a request may hold" in over.json()["error"]["message"]


def body_of(text: str, **fields) -> bytes:
    """A request for hd.mp4 with ``text`` as its question, as UTF-8 JSON (characters unescaped)."""
    content = [{"type": "video_url", "video_url": {"url": "hd.mp4"}}, {"type": "text", "text": text}]
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 1, **fields},
                      ensure_ascii=False).encode()


def post_raw(base: str, raw: bytes) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"},
                      timeout=300)


def test_a_body_costs_at_most_about_three_times_its_size(served):
    """Issue 40: a 64 MiB body cost ~585 MB at its peak (9x): its chunks were joined into a copy,
    json.loads decoded it into one string as wide as its widest character (4 bytes a character
    for one emoji), and the field that held the emoji became a string as wide. Now the body is
    read into one buffer, written in ASCII before it is parsed, and a field holding characters
    beyond Latin-1 is bounded by the text a request may have (checked on the raw bytes)."""
    base, pid, log = served
    size = 60 * MIB
    peak_growth_mib(pid, lambda: post_raw(base, body_of("What?")))  # first use of every path
    ordinary, ordinary_reply = peak_growth_mib(pid, lambda: post_raw(base, body_of("What? 😀", user="u" * size)))
    hostile, hostile_reply = peak_growth_mib(pid, lambda: post_raw(base, body_of("What?", user="u" * size + "😀")))
    print(f"a {size / MIB:.0f} MiB body: +{ordinary:.0f} MiB answered, +{hostile:.0f} MiB refused")
    assert ordinary < 3 * size / MIB + 100, f"the server grew by {ordinary:.0f} MiB for a {size / MIB:.0f} MiB body"
    assert hostile < 2 * size / MIB, f"the server grew by {hostile:.0f} MiB for a {size / MIB:.0f} MiB body"
    assert ordinary_reply.status_code == 200, (ordinary_reply.text, log.read_text()[-2000:])
    assert hostile_reply.status_code == 400 and hostile_reply.json()["error"]["code"] == "too_much_wide_text"
