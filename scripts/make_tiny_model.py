#!/usr/bin/env python
"""Write a tiny random checkpoint of a model family (for tests and offline demos), or with --arch a
full-size one with random bfloat16 weights (for speed measurements only)."""

import argparse

from aim_llava.architectures import ARCHITECTURES, architecture
from aim_llava.model.families import FAMILIES
from aim_llava.tiny_checkpoint import LAYOUTS, write_random_checkpoint, write_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llava_onevision",
                        help="model family (default llava_onevision; --arch implies its own)")
    parser.add_argument("--layout", choices=LAYOUTS, default="llava_qwen", help="LLaVA-OneVision's checkpoint layout")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES),
                        help="write this full-size architecture instead (random weights; 7B: ~16 GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-size", type=int,
                        help="the tiny LLaVA text model's head size (default 16; vLLM's CPU attention needs e.g. 64)")
    parser.add_argument("--processor", action="store_true",
                        help="also write transformers' processor files (HF layout; what vLLM loads)")
    args = parser.parse_args()
    if args.processor and args.layout != "hf":
        parser.error("--processor needs --layout hf")
    if args.arch:
        config = architecture(args.arch)
        if args.head_size is not None:
            parser.error("--head-size applies to the tiny model; --arch has its architecture's")
        if args.family != "llava_onevision" and config.family != args.family:
            parser.error(f"--arch {args.arch} is a {FAMILIES[config.family].title} architecture, not {args.family}")
        if config.family == "qwen2_5_vl":
            from aim_llava.tiny_qwen2_5_vl import write_random_qwen_checkpoint

            path = write_random_qwen_checkpoint(args.out, config, args.seed)
        else:
            path = write_random_checkpoint(args.out, config, args.seed, args.layout, args.processor)
        print(f"wrote a random {args.arch} checkpoint (random weights: for speed, not answers) to {path}")
        return
    if args.family == "qwen2_5_vl":
        if args.head_size is not None or args.processor or args.layout != "llava_qwen":
            parser.error("--head-size, --processor and --layout apply to LLaVA-OneVision checkpoints")
        from aim_llava.tiny_qwen2_5_vl import write_tiny_qwen_checkpoint

        path = write_tiny_qwen_checkpoint(args.out, args.seed)
        print(f"wrote a tiny Qwen2.5-VL checkpoint (random weights, outputs random text) to {path}")
        return
    path = write_tiny_checkpoint(args.out, args.layout, args.seed, args.head_size, args.processor)
    print(f"wrote tiny {args.layout} checkpoint (random weights, outputs random text) to {path}")


if __name__ == "__main__":
    main()
