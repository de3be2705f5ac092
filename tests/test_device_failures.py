"""When the GPU itself fails or runs out of memory, with faked errors: a sticky CUDA error ends the
work at once (not retried item by item, not taken for a fallback), is one line on the command
line, and turns the server's /health to 503 with the reason while requests fail fast with it;
running out of memory empties the reuse cache and retries the request once, then says how much
memory was needed."""

import json

import pytest
import torch
from conftest import in_process_service, random_frames

from aim_llava.cli import main
from aim_llava.errors import DeviceFailure, DeviceMemoryError
from aim_llava.model.language_model.llava_qwen import LlavaQwenForCausalLM
from aim_llava.pipeline import Request, VideoLLM
from aim_llava.sample_media import write_sample_video
from aim_llava.video import VideoClip

ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"
OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.57 GiB of which "
                 "1.25 GiB is free. Including non-PyTorch memory, this process has 22.31 GiB memory in use.")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    for index in range(2):
        write_sample_video(root / f"clip{index}.mp4", num_frames=20, fps=20)
    return root


def clip(seed: int) -> VideoClip:
    return VideoClip(random_frames(2, 48, 64, seed=seed), [0, 1], [0.0, 1.0], 2.0, 1.0, f"clip{seed}")


class Failing:
    """A stand-in for ``model.generate`` that raises ``errors`` in turn (None: the real call)."""

    def __init__(self, real, *errors):
        self.real, self.errors, self.calls = real, list(errors), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        return self.real(*args, **kwargs)


def test_a_device_failure_in_a_batch_is_raised_at_once(loaded, monkeypatch):
    """A batch of two whose generate call meets a sticky CUDA error: the run stops with
    DeviceFailure (one line naming the CUDA error), without answering the items one by one."""
    tokenizer, model, processor, _ = loaded
    llm = VideoLLM(tokenizer, model, processor, cache_mb=0)
    failing = Failing(model.generate, torch.AcceleratorError(ILLEGAL_ADDRESS))
    monkeypatch.setattr(model, "generate", failing)
    with pytest.raises(DeviceFailure) as raised:
        list(llm.run([Request(clip(1), max_new_tokens=3), Request(clip(2), max_new_tokens=3)], batch_size=2))
    assert failing.calls == 1
    assert "\n" not in str(raised.value) and ILLEGAL_ADDRESS in str(raised.value) and "restart" in str(raised.value)


def test_a_device_failure_is_one_line_on_the_command_line(capsys, monkeypatch, media, tiny_qwen_dir):
    def illegal_address(*args, **kwargs):
        raise torch.AcceleratorError(ILLEGAL_ADDRESS)

    monkeypatch.setattr(LlavaQwenForCausalLM, "generate", illegal_address)
    code = main(["caption", str(media / "clip0.mp4"), str(media / "clip1.mp4"), "--model", str(tiny_qwen_dir),
                 "--frames", "2", "--max-new-tokens", "2", "--json"])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("aim-llava: error:")]
    assert len(lines) == 1 and "the GPU failed" in lines[0] and ILLEGAL_ADDRESS in lines[0]


def test_the_servers_health_says_the_gpu_failed_and_requests_fail_fast(tiny_qwen_dir, media, monkeypatch):
    """The model thread's first request meets a sticky CUDA error: it is answered 503 with the
    reason, /health answers 503 with the same reason (it said 200 while every request failed), and
    the next request is refused at once, without reaching the model."""
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip0.mp4"}},
                                                      {"type": "text", "text": "What is it?"}]}], "max_tokens": 2}
    with in_process_service(tiny_qwen_dir, media, max_batch_size=1, max_wait_ms=0) as (llm, service):
        with TestClient(create_app(service), base_url="http://localhost") as http:
            assert http.get("/health").status_code == 200
            failing = Failing(llm.model.generate, torch.AcceleratorError(ILLEGAL_ADDRESS))
            monkeypatch.setattr(llm.model, "generate", failing)
            first = http.post("/v1/chat/completions", json=body)
            assert first.status_code == 503 and ILLEGAL_ADDRESS in first.json()["error"]["message"]
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "error"
            assert ILLEGAL_ADDRESS in health.json()["reason"] and "restart" in health.json()["reason"]
            second = http.post("/v1/chat/completions", json=body)
            assert second.status_code == 503 and ILLEGAL_ADDRESS in second.json()["error"]["message"]
            assert failing.calls == 1


@pytest.fixture
def llm_with_a_cached_clip(loaded):
    """A VideoLLM whose reuse cache holds one clip (and its prefix), and that clip's answer."""
    tokenizer, model, processor, _ = loaded
    llm = VideoLLM(tokenizer, model, processor, cache_mb=64)
    answer = llm.ask(clip(3), "What happens?", max_new_tokens=3)
    assert llm.cache.used > 0
    return llm, answer


def test_out_of_memory_empties_the_reuse_cache_and_retries_once(llm_with_a_cached_clip, monkeypatch, caplog):
    llm, answer = llm_with_a_cached_clip
    held = llm.cache.used
    failing = Failing(llm.model.generate, torch.OutOfMemoryError(OUT_OF_MEMORY))
    monkeypatch.setattr(llm.model, "generate", failing)
    assert llm.ask(clip(4), "What happens?", max_new_tokens=3) is not None
    assert failing.calls == 2 and len(llm.cache.entries) <= 2  # only what the retried request stored
    assert f"gives its {held / 2**20:.0f} MiB back" in caplog.text
    monkeypatch.setattr(llm.model, "generate", failing.real)
    assert llm.ask(clip(3), "What happens?", max_new_tokens=3) == answer  # the retry computes what the cache held


def test_out_of_memory_twice_says_how_much_was_needed(llm_with_a_cached_clip, monkeypatch):
    llm, _ = llm_with_a_cached_clip
    held = llm.cache.used
    failing = Failing(llm.model.generate, *[torch.OutOfMemoryError(OUT_OF_MEMORY)] * 3)
    monkeypatch.setattr(llm.model, "generate", failing)
    with pytest.raises(DeviceMemoryError) as raised:
        llm.ask(clip(3), "What happens?", max_new_tokens=3)
    assert failing.calls == 2 and llm.cache.used == 0
    message = str(raised.value)
    assert "\n" not in message and "it needed 2.00 GiB more, with 1.25 GiB free of 23.57 GiB" in message
    assert f"after the reuse cache gave back {held / 2**20:.0f} MiB" in message and "fewer frames" in message


def test_out_of_memory_with_nothing_cached_is_not_retried(loaded, monkeypatch):
    tokenizer, model, processor, _ = loaded
    llm = VideoLLM(tokenizer, model, processor, cache_mb=0)
    failing = Failing(model.generate, *[torch.OutOfMemoryError(OUT_OF_MEMORY)] * 2)
    monkeypatch.setattr(model, "generate", failing)
    with pytest.raises(DeviceMemoryError, match="it needed 2.00 GiB more") as raised:
        llm.ask(clip(5), "What happens?", max_new_tokens=3)
    assert failing.calls == 1 and "reuse cache" not in str(raised.value)


def test_out_of_memory_in_a_batch_answers_the_items_that_fit_alone(loaded, monkeypatch):
    """A batch that does not fit is answered one item at a time: only an item that does not fit
    by itself gets the memory error (as a record: the others are answered)."""
    tokenizer, model, processor, _ = loaded
    llm = VideoLLM(tokenizer, model, processor, cache_mb=0)
    failing = Failing(model.generate, torch.OutOfMemoryError(OUT_OF_MEMORY), None,
                      torch.OutOfMemoryError(OUT_OF_MEMORY))
    monkeypatch.setattr(model, "generate", failing)
    first, second = llm.run([Request(clip(6), max_new_tokens=3), Request(clip(7), max_new_tokens=3)], batch_size=2)
    assert first.error is None and isinstance(second.error, DeviceMemoryError) and failing.calls == 3
    assert json.dumps(str(second.error))  # a plain one-line message


def out_of_memory_on_the_first_calls(monkeypatch, count: int) -> list[int]:
    """``generate`` of every tiny model raises CUDA's out-of-memory error on its first ``count``
    calls; returns the list its calls are counted in."""
    real, calls = LlavaQwenForCausalLM.generate, []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) <= count:
            raise torch.OutOfMemoryError(OUT_OF_MEMORY)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlavaQwenForCausalLM, "generate", generate)
    return calls


@pytest.mark.parametrize("command", ["caption", "eval"])
def test_out_of_memory_on_the_command_line_is_a_system_error(capsys, monkeypatch, media, tiny_qwen_dir, tmp_path,
                                                            command):
    """An item that runs out of device memory is recorded failed with the one line saying so, the
    next one is answered, and the exit code is 1, not 2 (bad input: before, it read as the
    user's fault)."""
    out_of_memory_on_the_first_calls(monkeypatch, 1)  # no reuse cache (--cache-mb 0): not tried again
    videos = [media / "clip0.mp4", media / "clip1.mp4"]
    common = ["--model", tiny_qwen_dir, "--frames", 2, "--max-new-tokens", 2, "--cache-mb", 0]
    if command == "caption":
        output = tmp_path / "caps.jsonl"
        code = main([str(a) for a in ["caption", *videos, *common, "--batch-size", 1, "--output", output]])
    else:
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps({"id": f"q{i}", "video": str(video), "question": "?",
                                            "options": ["a", "b"], "answer": "A"}) + "\n"
                                for i, video in enumerate(videos)))
        output = tmp_path / "out" / "baseline.jsonl"
        code = main([str(a) for a in ["eval", "--data", data, *common, "--output", output.parent]])
    _, err = capsys.readouterr()
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert code == 1, err
    assert "out of device memory" in records[0]["error"] and "it needed 2.00 GiB more" in records[0]["error"]
    assert records[1]["error"] is None
    assert "Traceback" not in err and any("out of device memory" in line for line in err.splitlines())


def test_out_of_memory_escaping_a_command_is_exit_code_1(capsys, monkeypatch, tiny_qwen_dir):
    """A DeviceMemoryError that ends a command (here ``bench``, which answers no item by item) is
    one line and exit code 1."""
    from aim_llava import cli

    def out_of_memory(args):
        raise DeviceMemoryError("out of device memory for this request (it needed 2.00 GiB more): ask with fewer "
                                "frames")

    monkeypatch.setitem(cli.COMMANDS, "bench", out_of_memory)
    code = main(["bench", "--model", str(tiny_qwen_dir)])
    _, err = capsys.readouterr()
    assert code == 1 and err.strip() == ("aim-llava: error: out of device memory for this request (it needed 2.00 GiB "
                                         "more): ask with fewer frames")


def test_the_server_answers_out_of_memory_503_and_goes_on(tiny_qwen_dir, media, monkeypatch):
    """A request that runs out of device memory is the server's trouble, not the client's: 503
    with a line saying so and Retry-After (before: 400 invalid_prompt); /health stays 200 and the
    next request is answered."""
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip0.mp4"}},
                                                      {"type": "text", "text": "What is it?"}]}], "max_tokens": 2}
    with in_process_service(tiny_qwen_dir, media, max_batch_size=1, max_wait_ms=0) as (llm, service):
        with TestClient(create_app(service), base_url="http://localhost") as http:
            calls = out_of_memory_on_the_first_calls(monkeypatch, 2)  # tried once more after the cache is emptied
            first = http.post("/v1/chat/completions", json=body)
            error = first.json()["error"]
            assert first.status_code == 503 and first.headers["retry-after"] == "1", first.text
            assert error["type"] == "server_error" and error["code"] != "invalid_prompt"
            assert "ran out of device memory" in error["message"] and "retry later" in error["message"]
            assert http.get("/health").status_code == 200
            second = http.post("/v1/chat/completions", json=body)
            assert second.status_code == 200 and len(calls) == 3, second.text


def test_only_a_command_writing_results_says_resume_goes_on(capsys, monkeypatch, tiny_qwen_dir, media):
    """An OSError (here: the port in use) ends ``serve`` with one line and exit code 1, without
    the words about --resume, which only caption, ask and eval with --output can keep (before,
    every command's OSError ended with them)."""
    from aim_llava import cli

    def port_in_use(args):
        raise OSError(98, "Address already in use")

    monkeypatch.setitem(cli.COMMANDS, "serve", port_in_use)
    monkeypatch.setitem(cli.COMMANDS, "caption", port_in_use)
    code = main(["serve", "--model", str(tiny_qwen_dir), "--media-root", str(media)])
    _, err = capsys.readouterr()
    assert code == 1 and err.strip() == "aim-llava: error: Address already in use"
    code = main(["caption", str(media / "clip0.mp4"), "--model", str(tiny_qwen_dir)])
    _, err = capsys.readouterr()
    assert code == 1 and err.strip() == "aim-llava: error: Address already in use"
    code = main(["caption", str(media / "clip0.mp4"), "--model", str(tiny_qwen_dir), "--output", str(media / "o.jsonl")])
    _, err = capsys.readouterr()
    assert code == 1 and "--resume goes on from there" in err
