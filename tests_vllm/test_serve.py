"""The issue's fourth check: `vllm serve` with the plugin (selected by --hf-overrides) answers
the openai client's chat request with a video, and counts the merged tokens in the prompt; a
request's own preset (``mm_processor_kwargs``) changes its count, and one the plugin cannot run
is a 400 naming it.
(The command runs through tests_vllm/vllm_cli.py: the CPU build's own `vllm` script cannot start.)"""

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import QUESTION, aim_overrides, vllm_prompt
from openai import BadRequestError, OpenAI
from transformers import AutoTokenizer

from aim_llava.sample_media import write_sample_video

FRAMES = 4
MERGED_PER_FRAME = 49  # 196 -> 98 -> 49 (docs/algorithms.md §2)
POOLED_PER_FRAME = 25  # pool_12: a 5x5 grid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(server: subprocess.Popen, url: str, log: Path, seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vllm serve was not healthy after {seconds:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def server(tmp_path, checkpoint):
    port, log = free_port(), tmp_path / "serve.log"
    command = [
        sys.executable, str(Path(__file__).with_name("vllm_cli.py")), "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "tiny", "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
        "--limit-mm-per-prompt", json.dumps({"image": 0, "video": 1}),
        "--media-io-kwargs", json.dumps({"video": {"num_frames": FRAMES}}),
        "--hf-overrides", json.dumps(aim_overrides("aim_merge_only")),
        "--trust-request-mm-kwargs",  # lets a request name its own preset (mm_processor_kwargs)
    ]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}/health", log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_vllm_serve_with_the_plugin_answers_the_openai_client(server, tmp_path, checkpoint):
    video = write_sample_video(tmp_path / "clip.mp4", num_frames=2 * FRAMES, fps=4)
    url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    client = OpenAI(base_url=server, api_key="unused", timeout=600)

    def ask(**extra):
        return client.chat.completions.create(
            model="tiny", max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True, **extra},
            messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                   {"type": "text", "text": QUESTION}]}],
        )

    reply = ask()
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens == 6
    text_tokens = len(AutoTokenizer.from_pretrained(str(checkpoint))(vllm_prompt()).input_ids) - 1  # less <video>
    assert reply.usage.prompt_tokens == text_tokens + FRAMES * MERGED_PER_FRAME + 1
    pooled = ask(mm_processor_kwargs={"aim_reduction": "pool_12"})  # this request's own preset
    assert pooled.usage.prompt_tokens == text_tokens + FRAMES * POOLED_PER_FRAME + 1
    with pytest.raises(BadRequestError, match="'aim_default' .* acts inside the LLM"):
        ask(mm_processor_kwargs={"aim_reduction": "aim_default"})
