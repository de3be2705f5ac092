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
