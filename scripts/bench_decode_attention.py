"""The decoding step's attention alone, per implementation, over (batch, cache length) shapes.

One decoding step attends with one query per sample over a layer's whole preallocated cache,
masked to the written slots (aim_llava.model.attention.attend, query heads folded onto their
key/value head). On a long cache, cuDNN's and the memory-efficient SDPA kernels launch only about
batch x kv_heads blocks for it (no split over keys), which may leave most of a GPU idle; eager
attention is two batched matrix products and a softmax. This table says which is faster at each
shape (issue 28 item 10), so that the decode step can pick per shape.

    python scripts/bench_decode_attention.py --device cuda --dtype bfloat16 \\
        --batch 1,4,16 --cache 1769,6373,9609 --json decode_attention.json

Defaults: Qwen2-7B's heads (28 query, 4 key/value, dimension 128). Implementations: ``eager``,
``sdpa`` (SDPA's own choice of kernel) and SDPA restricted to one kernel (``sdpa:efficient``,
``sdpa:cudnn``, ``sdpa:math``); a kernel that refuses the inputs gets a row saying so. On CUDA each
variant is captured as a CUDA graph and replayed, as decoding runs it (launch overheads do not
count), on a side stream of the device asked for (made the current device for the whole run), and
timed with CUDA events on that device's stream; elsewhere with the clock. Every output is checked
against float64 attention; the fastest correct one per shape is marked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aim_llava.devices import on_device  # noqa: E402
from aim_llava.model.attention import attend  # noqa: E402
from aim_llava.model.language_model.generation import capture_graph  # noqa: E402

KERNELS = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "math": SDPBackend.MATH}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def step_inputs(batch: int, length: int, heads: int, kv_heads: int, dim: int, dtype, device, seed: int = 0):
    """q [B, heads, 1, d], the cache's keys and values [B, kv_heads, length, d] and its mask
    [B, 1, 1, length]: the last eighth of the slots unwritten (the room left for new tokens)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen) for _ in range(2))
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[..., length - length // 8 :] = False
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in (q, k, v)] + [mask.to(device)]


def reference(q, k, v, mask, scale) -> torch.Tensor:
    """float64 attention [B, heads, 1, d]; query head h reads key/value head h // groups."""
    batch, heads, _, dim = q.shape
    grouped = q.double().view(batch, k.shape[1], heads // k.shape[1], dim)  # the heads sharing a key head
    scores = (grouped @ k.double().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.double()).view(batch, heads, 1, dim)


def variant(name: str, q, k, v, mask, scale):
    """The step's attention as implementation ``name``, a function of no arguments."""
    implementation, _, kernel = name.partition(":")
    context = (lambda: sdpa_kernel([KERNELS[kernel]])) if kernel else nullcontext

    def run():
        with context():
            return attend(q, k, v, mask, False, scale, implementation)

    return run


def seconds_per_call(run, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        run()
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        return (time.perf_counter() - started) / repeats
    side, current = torch.cuda.Stream(device=device), torch.cuda.current_stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        run()
    current.wait_stream(side)
    graph, _ = capture_graph(run, side, device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(current)
    for _ in range(repeats):
        graph.replay()
    end.record(current)
    end.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def measure(args) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = ["eager", "sdpa"] + [f"sdpa:{kernel}" for kernel in KERNELS]
    scale, rows = args.head_dim**-0.5, []
    for batch in args.batch:
        for length in args.cache:
            q, k, v, mask = step_inputs(batch, length, args.heads, args.kv_heads, args.head_dim, dtype, device)
            expected = reference(q, k, v, mask, scale)
            shape_rows = []
            for name in names:
                row = {"batch": batch, "cache": length, "implementation": name}
                run = variant(name, q, k, v, mask, scale)
                try:
                    error = (run().double() - expected).abs().max().item()
                    row.update(error=error, us=1e6 * statistics.median(
                        seconds_per_call(run, device, args.repeats) for _ in range(3)))
                except RuntimeError as failure:  # a kernel that does not take these inputs
                    row["unsupported"] = str(failure).splitlines()[0][:120]
                shape_rows.append(row)
            correct = [row for row in shape_rows if "us" in row and row["error"] <= TOLERANCE[dtype]]
            if correct:
                min(correct, key=lambda row: row["us"])["fastest"] = True
            rows += shape_rows
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = [f"decode-step attention, {args.heads} query / {args.kv_heads} key-value heads of {args.head_dim}, "
             f"{args.dtype}, {args.device}; median of 3 x {args.repeats} calls", "",
             "| batch | cache | implementation | us per step | max error vs float64 |", "|---|---|---|---|---|"]
    for row in rows:
        if "us" in row:
            mark = " (fastest)" if row.get("fastest") else ""
            lines.append(f"| {row['batch']} | {row['cache']} | {row['implementation']}{mark} | {row['us']:.1f} | "
                         f"{row['error']:.2e} |")
        else:
            lines.append(f"| {row['batch']} | {row['cache']} | {row['implementation']} | unsupported: "
                         f"{row['unsupported']} | |")
    return "\n".join(lines)


def numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=numbers, default=[1, 4, 16])
    parser.add_argument("--cache", type=numbers, default=[1769, 6373, 9609], help="cache lengths (slots)")
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args()
    with on_device(args.device):  # streams, events and captures made without a device follow the current one
        rows = measure(args)
    print(markdown(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"arguments": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
