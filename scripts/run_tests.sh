#!/usr/bin/env bash
# The test command of the README (and of CI): install into .venv, then run the suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q tests "$@"
