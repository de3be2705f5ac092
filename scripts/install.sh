#!/usr/bin/env bash
# Create .venv (once) and install the package with its test dependencies.
# torch 2.14.1 / torchvision 0.29.1 are pinned because they install together from the local
# wheel index and make torchvision (used by transformers' processors and qwen-vl-utils) import.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"

# torchcodec (an optional video reader) loads FFmpeg's shared libraries from the system.
ffmpeg_libs=(libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8)
if ! ldconfig -p | grep -q "libavcodec\.so" && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
  timeout 300 apt-get install -y -q --no-install-recommends "${ffmpeg_libs[@]}" >/dev/null 2>&1 \
    || { timeout 300 apt-get update -q >/dev/null 2>&1 \
         && timeout 300 apt-get install -y -q --no-install-recommends "${ffmpeg_libs[@]}" >/dev/null 2>&1; } \
    || echo "note: FFmpeg's shared libraries could not be installed: the torchcodec reader stays unusable" >&2
fi
