#!/usr/bin/env python
"""Compile the importance kernels for a CUDA GPU without one, and print what each launch needs.

    python scripts/compile_kernels.py [--capability 90] [--dtypes bfloat16,float16,float32]
                                      [--tilings 64x64x4x3,128x64x8x3] [--tokens 6373] [--json FILE]

For every launch (the fused kernel's two passes per dtype and tiling, then the chunked kernel's
float32 log-sum-exp): registers per thread, shared memory per program, bytes spilled to local
memory, the tensor-core instruction in the PTX (none: the products run on the ordinary cores),
programs one SM can hold (an upper bound) and whether the shared memory fits a block. Static
facts of the compiled code (aim_llava.offline_compile), not timings: those need the GPU
(scripts/bench_importance.py). Exits 1 if a launch fails to compile or does not fit.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from aim_llava.capabilities import FUSED_IMPORTANCE_CAPABILITIES
from aim_llava.offline_compile import compile_for_target, fused_importance_launches, logsumexp_launches
from aim_llava.reduction.attention_lse import Tiling


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", type=int, default=90,
                        help="CUDA compute capability: 90 = H100/H200, 80 = A100, 75 = T4, 70 = V100")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--tilings", default=str(Tiling()), help="OUTERxINNERxWARPSxSTAGES, comma-separated")
    parser.add_argument("--tokens", type=int, default=6373, help="sequence length N (shapes only)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import triton

    launches = [(dtype, launch) for dtype in args.dtypes.split(",") for tiling in args.tilings.split(",")
                for launch in fused_importance_launches(getattr(torch, dtype), Tiling.parse(tiling), args.tokens)]
    launches += [("float32", launch) for launch in logsumexp_launches(args.tokens)]
    print(f"sm_{args.capability}, triton {triton.__version__}, torch {torch.__version__}, N = {args.tokens}; "
          f"importance_kernel=auto runs the fused kernel there: "
          f"{'yes' if args.capability in FUSED_IMPORTANCE_CAPABILITIES else 'no (chunked)'}")
    print("| launch | dtype | registers | shared KiB | spilled B | tensor-core instruction | programs/SM | fits |")
    print("|---|---|---|---|---|---|---|---|")
    rows, failed = [], False
    for dtype, launch in launches:
        try:
            resources = compile_for_target(launch.kernel, launch.arguments, launch.options, args.capability)
        except Exception as error:  # a compile error is this script's finding: report it, go on
            print(f"| {launch.name} | {dtype} | compile failed: {str(error).splitlines()[0][:120]} |||||")
            rows.append({"launch": launch.name, "dtype": dtype, "error": str(error)})
            failed = True
            continue
        fits = resources.fits(args.capability)
        failed |= not fits
        instruction = ", ".join(resources.matrix_instructions) or "none"
        print(f"| {launch.name} | {dtype} | {resources.registers} | {resources.shared_bytes / 1024:.0f} | "
              f"{resources.local_bytes} | {instruction} | {resources.resident_programs(args.capability)} | "
              f"{'yes' if fits else 'NO'} |")
        rows.append({"launch": launch.name, "dtype": dtype, "registers": resources.registers,
                     "shared_bytes": resources.shared_bytes, "local_bytes": resources.local_bytes,
                     "matrix_instructions": list(resources.matrix_instructions),
                     "programs_per_sm": resources.resident_programs(args.capability), "fits": fits})
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"capability": args.capability, "triton": triton.__version__, "tokens": args.tokens,
                       "launches": rows}, file, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
