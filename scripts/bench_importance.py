#!/usr/bin/env python
"""Time the PageRank importance kernels alone (docs/algorithms.md §3), as the importance share of
a prefill depends on them.

    python scripts/bench_importance.py [--device cuda] [--tokens 1769,6373,9609] [--kernels fused,chunked,flex]
                                       [--fused-tilings 128x64x8x3,...]

Random q [1, heads, N, d] and k [1, kv_heads, N, d] in --dtype (7B's 28/4 heads of 128 by
default), every token visible. For each kernel and length: the first call (compilation included),
then the median of --repeats warm calls (CUDA events on a GPU), the extra peak memory of a call
(CUDA's max allocated; on the CPU the process's peak RSS), the largest relative difference from
the float32 chunked kernel and whether the top half is the same set. Prints a Markdown table;
--json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from aim_llava.bench import PeakMemory
from aim_llava.devices import on_device
from aim_llava.reduction.attention_lse import Tiling
from aim_llava.reduction.importance import log_importance, pagerank_log_importance_fused
from aim_llava.timing import StageTimes, stage


def timed(call, device: str) -> tuple[float, torch.Tensor]:
    """Seconds of one call (CUDA events on a GPU) and its result."""
    with StageTimes() as times:
        with stage("call", device):
            result = call()
    return times.seconds()["call"], result


def main() -> None:
    args = parse_arguments()
    with on_device(args.device):  # Triton launches on the current device's stream: make it the one timed
        measure(args)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", default="1769,6373,9609", help="sequence lengths N, comma-separated")
    parser.add_argument("--kernels", default=None, help="default: fused,chunked,flex on CUDA; factored,chunked on CPU")
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--fused-tilings", default="",
                        help="more launch shapes of the fused kernel to time, e.g. 128x64x8x3,64x32x4x2 "
                             "(OUTERxINNERxWARPSxSTAGES)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def measure(args: argparse.Namespace) -> None:
    """Time the kernels (see the module docstring); prints the table, writes --json."""
    cuda = args.device.startswith("cuda")
    kernels = (args.kernels or ("fused,chunked,flex" if cuda else "factored,chunked")).split(",")
    kernels += [f"fused {tiling}" for tiling in filter(None, args.fused_tilings.split(","))]
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"{args.heads} heads ({args.kv_heads} kv), head dim {args.head_dim}, {args.dtype}, {args.device}, "
          f"torch {torch.__version__}{', ' + torch.cuda.get_device_name(args.device) if cuda else ''}")
    print("| N | kernel | first call ms | warm ms (median) | peak extra MiB | max rel. diff vs float32 chunked | "
          "same top half |")
    print("|---|---|---|---|---|---|---|")
    for n in map(int, args.tokens.split(",")):
        gen = torch.Generator(device=args.device).manual_seed(n)
        q = torch.randn(1, args.heads, n, args.head_dim, device=args.device, generator=gen).to(dtype)
        k = torch.randn(1, args.kv_heads, n, args.head_dim, device=args.device, generator=gen).to(dtype)
        mask = torch.ones(1, n, dtype=torch.bool, device=args.device)
        log_start = torch.full((1, n), -math.log(n), device=args.device)
        scale = args.head_dim**-0.5
        reference = log_importance(q.float(), k.float(), mask, log_start, scale, kernel="chunked")
        top = set(reference[0].topk(n // 2).indices.tolist())
        for kernel in kernels:
            def call(kernel=kernel):
                if kernel.startswith("fused "):
                    return pagerank_log_importance_fused(q, k, mask, log_start, scale, tiling=Tiling.parse(kernel[6:]))
                return log_importance(q, k, mask, log_start, scale, kernel=kernel)

            started = time.perf_counter()
            result = call()
            if cuda:
                torch.cuda.synchronize()
            first = time.perf_counter() - started
            warm = statistics.median(timed(call, args.device)[0] for _ in range(args.repeats))
            with PeakMemory(torch.device(args.device)) as memory:
                call()
            peak = memory.extra / 2**20
            finite = torch.isfinite(reference)
            difference = ((result - reference)[finite].abs() / reference[finite].abs().clamp(min=1e-6)).max().item()
            same = set(result[0].topk(n // 2).indices.tolist()) == top
            rows.append({"tokens": n, "kernel": kernel, "first_ms": first * 1e3, "warm_ms": warm * 1e3,
                         "peak_mib": peak, "max_rel_diff": difference, "same_top_half": same})
            print(f"| {n} | {kernel} | {first * 1e3:.1f} | {warm * 1e3:.2f} | {peak:.0f} | {difference:.1e} | {same} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": args.device, "dtype": args.dtype, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
