#!/usr/bin/env python
"""Write a tiny random LLaVA-OneVision checkpoint (for tests and offline demos)."""

import argparse

from aim_llava.tiny_checkpoint import LAYOUTS, write_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--layout", choices=LAYOUTS, default="llava_qwen")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = write_tiny_checkpoint(args.out, args.layout, args.seed)
    print(f"wrote tiny {args.layout} checkpoint (random weights, outputs random text) to {path}")


if __name__ == "__main__":
    main()
