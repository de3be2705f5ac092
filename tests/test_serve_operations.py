"""Operating aim-llava serve (issue 39, item 9): an access-log line per request, Prometheus
metrics at /metrics, unknown routes and n != 1 refused in OpenAI's shape and words, and chat
without media answered, as transformers' own model answers it."""

import logging
import re

import pytest
import torch
from conftest import in_process_service, prompt_ids

from aim_llava.flops import video_token_counts
from aim_llava.sample_media import write_sample_video

FRAMES = 2
LINE = re.compile(r"(?P<method>\S+) (?P<path>\S+) (?P<status>\d{3}) id=(?P<id>\S+)(?: prompt_tokens=(?P<prompt>\d+) "
                  r"visual_tokens=(?P<visual>\d+) completion_tokens=(?P<completion>\d+) ttft_s=(?P<ttft>[\d.]+))? "
                  r"latency_s=(?P<latency>[\d.]+)")
SAMPLE = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("operations_media")
    write_sample_video(root / "clip.mp4", num_frames=12, fps=10)
    return root


@pytest.fixture(scope="module")
def served(tiny_qwen_dir, media):
    """(VideoLLM, Service, HTTP client) in this process, the reuse cache on."""
    from fastapi.testclient import TestClient

    from aim_llava.serve import create_app

    with in_process_service(tiny_qwen_dir, media, frames=FRAMES) as (llm, service):
        with TestClient(create_app(service), base_url="http://localhost") as http:
            yield llm, service, http


def chat(content, **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3, **fields}


def video(question: str = "What?") -> list[dict]:
    return [{"type": "video_url", "video_url": {"url": "clip.mp4"}}, {"type": "text", "text": question}]


def access_lines(caplog) -> list[dict]:
    return [LINE.fullmatch(record.getMessage()).groupdict() for record in caplog.records
            if record.name == "aim_llava.access"]


def metrics(http) -> dict[tuple[str, str], float]:
    """(name, labels) -> value of every sample /metrics gives, read as Prometheus' text format."""
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP [a-z_]+ .+|TYPE [a-z_]+ (counter|gauge|histogram))", line), line
            continue
        match = SAMPLE.fullmatch(line)
        assert match, line
        samples[match["name"], match["labels"] or ""] = float(match["value"])
    return samples


def test_each_request_gets_one_access_log_line(served, caplog):
    """Before, the server wrote nothing per request (uvicorn's access log is off). Each line
    now holds the status, the completion's id and usage as the client got them, the visual
    tokens (as the architecture's token count has them for 2 frames) and the latency."""
    llm, _, http = served
    caplog.set_level(logging.INFO, logger="aim_llava.access")
    reply = http.post("/v1/chat/completions", json=chat(video())).json()
    streamed = http.post("/v1/chat/completions", json=chat(video("Where?"), stream=True,
                                                           stream_options={"include_usage": True}))
    refused = http.post("/v1/chat/completions", json={"messages": "not a list"})
    lost = http.get("/v1/nothing")
    lines = access_lines(caplog)
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("POST", "/v1/chat/completions", "200"), ("POST", "/v1/chat/completions", "200"),
        ("POST", "/v1/chat/completions", "400"), ("GET", "/v1/nothing", "404")]
    first, second = lines[0], lines[1]
    assert first["id"] == reply["id"] and int(first["prompt"]) == reply["usage"]["prompt_tokens"]
    assert int(first["completion"]) == reply["usage"]["completion_tokens"]
    assert int(first["visual"]) == video_token_counts(llm.model.config, llm.plan(llm.reduction), FRAMES, 0)[0]
    usage = [line for line in streamed.text.splitlines() if '"usage"' in line][-1]
    assert second["id"] in streamed.text and f'"completion_tokens": {second["completion"]}' in usage
    assert 0 < float(first["ttft"]) <= float(first["latency"])
    assert refused.status_code == 400 and lines[2]["id"] == "-" and lines[2]["prompt"] is None
    assert lost.status_code == 404


def test_metrics_count_requests_tokens_latency_and_cache_hits(served, caplog):
    """Before, there was no /metrics. Its counters now move by what the replies say (their
    usage), its histograms count each request once, and its cache counters are the reuse
    cache's own."""
    llm, service, http = served
    caplog.set_level(logging.INFO, logger="aim_llava.access")
    before = metrics(http)
    replies = [http.post("/v1/chat/completions", json=chat(video(question))).json() for question in ("A?", "B?")]
    http.post("/v1/chat/completions", json=chat(video(), n=2))
    after = metrics(http)

    def grew(name: str, labels: str = "") -> float:
        return after[name, labels] - before.get((name, labels), 0.0)

    lines = [line for line in access_lines(caplog) if line["path"] == "/v1/chat/completions"][-3:]
    assert grew("aim_llava_requests_total", 'status="200"') == 2
    assert grew("aim_llava_requests_total", 'status="400"') == 1
    assert grew("aim_llava_prompt_tokens_total") == sum(reply["usage"]["prompt_tokens"] for reply in replies)
    assert grew("aim_llava_generation_tokens_total") == sum(reply["usage"]["completion_tokens"] for reply in replies)
    assert grew("aim_llava_visual_tokens_total") == sum(int(line["visual"]) for line in lines[:2])
    assert grew("aim_llava_request_latency_seconds_count") == 3
    assert grew("aim_llava_time_to_first_token_seconds_count") == 2
    assert grew("aim_llava_request_latency_seconds_sum") == pytest.approx(
        sum(float(line["latency"]) for line in lines), abs=0.01)
    assert after["aim_llava_request_latency_seconds_bucket", 'le="+Inf"'] == after[
        "aim_llava_request_latency_seconds_count", ""]
    counts = llm.cache.snapshot()
    for kind in ("visual", "prefix"):
        assert after["aim_llava_cache_hits_total", f'kind="{kind}"'] == counts.hits[kind]
        assert after["aim_llava_cache_misses_total", f'kind="{kind}"'] == counts.misses[kind]
    assert grew("aim_llava_cache_hits_total", 'kind="visual"') >= 1  # the second question reused the clip
    for gauge in ("aim_llava_requests_pending", "aim_llava_requests_waiting_for_model", "aim_llava_media_readers_busy",
                  "aim_llava_media_reads_waiting", "aim_llava_request_body_bytes"):
        assert after[gauge, ""] == 0  # nothing in progress now
    assert service.pending == 0


@pytest.mark.parametrize("method, path, status, message", [
    ("GET", "/v1/nothing", 404, "Invalid URL (GET /v1/nothing)"),
    ("POST", "/v1/completions", 404, "Invalid URL (POST /v1/completions)"),
    ("GET", "/v1/chat/completions", 405, "Invalid method for URL (GET /v1/chat/completions)"),
])
def test_unknown_routes_are_refused_in_openais_shape(served, method, path, status, message):
    """Before: {"detail": "Not Found"}, which OpenAI clients do not read as an error."""
    response = served[2].request(method, path)
    assert response.status_code == status
    assert response.json() == {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                         "code": None}}


def test_n_other_than_one_is_refused_in_openais_words(served):
    """Before: "'n' must lie in [1, 1]"."""
    http = served[2]
    refused = http.post("/v1/chat/completions", json=chat(video(), n=2)).json()["error"]
    assert refused == {"message": "Unsupported value: 'n' does not support 2 with this model. Only the default (1) "
                                  "value is supported.", "type": "invalid_request_error", "param": "n",
                       "code": "unsupported_value"}
    assert "whole number" in http.post("/v1/chat/completions", json=chat(video(), n="2")).json()["error"]["message"]
    assert http.post("/v1/chat/completions", json=chat(video(), n=1)).status_code == 200


def test_chat_without_media_is_answered_as_transformers_answers_it(served, hf_oracle, monkeypatch):
    """Before, a chat without a video or image was refused ("the request shows no video or
    image"). Now it is answered, with the reply transformers' LlavaOnevision gives greedily to
    the same chat prompt (tiny checkpoint, the same weights in its layout); no media reader runs."""
    llm, service, http = served
    monkeypatch.setattr(service.readers, "read", None)  # calling it would fail the request
    question = "Tell me about a red ball on the table."
    reply = http.post("/v1/chat/completions", json=chat(question, max_tokens=6)).json()
    ids = prompt_ids(llm.tokenizer, question, num_images=0)
    eos = llm.model.generation_defaults.eos_token_ids
    with torch.no_grad():
        tokens = hf_oracle.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                                    pad_token_id=0)[0, ids.shape[1]:].tolist()
    ended = next((i for i, token in enumerate(tokens) if token in eos), len(tokens))
    assert reply["choices"][0]["message"]["content"] == llm.tokenizer.decode(tokens[:ended],
                                                                             skip_special_tokens=True).strip()
    assert reply["usage"]["prompt_tokens"] == ids.shape[1]
