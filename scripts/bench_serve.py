"""Throughput and latency of ``aim-llava serve`` under concurrent clients, with and without
request batching.

    python scripts/bench_serve.py [--model DIR] [--device cpu] [--requests 64] [--clients 1,8,32]

Without --model it writes the tiny random checkpoint (tests/demos only). For each server setting
(--max-batch-size 1, i.e. no batching, and --max-batch-size N) a real server process is started
on 127.0.0.1 and each client count sends --requests chat completions (one video each, greedy,
--max-tokens new tokens) through the official openai client; the table gives requests/s and the
p50/p95 latency.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

from aim_llava.sample_media import write_sample_video
from aim_llava.tiny_checkpoint import write_tiny_checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, media: Path, batch: int, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "aim_llava.cli", "serve", "--model", model, "--media-root", str(media),
               "--port", str(port), "--device", args.device, "--frames", str(args.frames),
               "--max-batch-size", str(batch), "--max-wait-ms", str(args.max_wait_ms), "--served-model-name", "m",
               "--config", args.config]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not start")


def load(base: str, clients: int, requests: int, videos: int, max_tokens: int) -> tuple[float, list[float]]:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    latencies, lock, counter = [], threading.Lock(), iter(range(requests))

    def worker():
        while True:
            with lock:
                number = next(counter, None)
            if number is None:
                return
            started = time.perf_counter()
            client.chat.completions.create(model="m", max_tokens=max_tokens, messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": f"v{number % videos}.mp4"}},
                {"type": "text", "text": f"Request {number}: what happens?"}]}])
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies


def percentile(values: list[float], share: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(share * 100) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--config", default="baseline", help="the server's reduction preset")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aim_llava_serve_"))
    model = args.model or str(write_tiny_checkpoint(work / "tiny"))
    media = work / "media"
    for i in range(8):
        write_sample_video(media / f"v{i}.mp4", num_frames=60 + 10 * i, fps=30)
    print("| server | clients | requests | requests/s | p50 latency s | p95 latency s |")
    print("|---|---|---|---|---|---|")
    for batch in (1, args.batch_size):
        process, base = start_server(model, media, batch, args)
        try:
            load(base, 2, 4, 8, args.max_tokens)  # warm-up
            for clients in (int(c) for c in args.clients.split(",")):
                seconds, latencies = load(base, clients, args.requests, 8, args.max_tokens)
                label = "no batching" if batch == 1 else f"batching (max {batch}, {args.max_wait_ms:g} ms)"
                print(f"| {label} | {clients} | {args.requests} | {args.requests / seconds:.2f} | "
                      f"{statistics.median(latencies):.2f} | {percentile(latencies, 0.95):.2f} |", flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
