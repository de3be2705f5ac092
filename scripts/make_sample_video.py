#!/usr/bin/env python
"""Write a small generated mp4 (each frame shows its index as bars) to try the commands on."""

import argparse

from aim_llava.sample_media import write_sample_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="mp4 path to write")
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--gop", type=int, default=12, help="frames between keyframes (x264's default is 250)")
    args = parser.parse_args()
    print(write_sample_video(args.out, args.frames, args.fps, args.height, args.width, args.gop))


if __name__ == "__main__":
    main()
