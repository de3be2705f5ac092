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
                        help="write this full-size architecture instead (LLaVA-NeXT layout; 7B: ~16 GB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.arch:
        path = write_random_checkpoint(args.out, architecture(args.arch), args.seed)
        print(f"wrote a random {args.arch} checkpoint (random weights: for speed, not answers) to {path}")
        return
    path = write_tiny_checkpoint(args.out, args.layout, args.seed)
    print(f"wrote tiny {args.layout} checkpoint (random weights, outputs random text) to {path}")


if __name__ == "__main__":
    main()
