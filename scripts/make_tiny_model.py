#!/usr/bin/env python
"""Write a tiny random LLaVA-OneVision checkpoint (for tests and offline demos), or with --arch a
full-size one with random bfloat16 weights (for speed measurements only)."""

import argparse

from aim_llava.architectures import ARCHITECTURES, architecture
from aim_llava.tiny_checkpoint import LAYOUTS, write_random_checkpoint, write_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--layout", choices=LAYOUTS, default="llava_qwen")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES),
                        help="write this full-size architecture instead (random weights; 7B: ~16 GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-size", type=int,
                        help="the tiny text model's head size (default 16; vLLM's CPU attention needs e.g. 64)")
    parser.add_argument("--processor", action="store_true",
                        help="also write transformers' processor files (HF layout; what vLLM loads)")
    args = parser.parse_args()
    if args.processor and args.layout != "hf":
        parser.error("--processor needs --layout hf")
    if args.arch:
        if args.head_size is not None:
            parser.error("--head-size applies to the tiny model; --arch has its architecture's")
        path = write_random_checkpoint(args.out, architecture(args.arch), args.seed, args.layout, args.processor)
        print(f"wrote a random {args.arch} checkpoint (random weights: for speed, not answers) to {path}")
        return
    path = write_tiny_checkpoint(args.out, args.layout, args.seed, args.head_size, args.processor)
    print(f"wrote tiny {args.layout} checkpoint (random weights, outputs random text) to {path}")


if __name__ == "__main__":
    main()
