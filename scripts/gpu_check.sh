#!/usr/bin/env bash
# The open GPU questions answered on this machine's GPU within a time budget (default 480 s,
# GPU_CHECK_BUDGET_S), counted from here. Wheels kept in .whl/ are installed first, on the same
# clock (for a GPU machine without network access: `bash scripts/fetch_gpu_wheels.sh check` where
# pip works puts PyAV, which the video phase needs, there). PYTHON: the interpreter with torch
# (default python3). Phases and what they measure: scripts/gpu_check.py. Summary and log in OUTDIR
# (default: gpu_results/):
#
#   bash scripts/gpu_check.sh [OUTDIR]
set -uo pipefail
started=$(date +%s.%N)
cd "$(dirname "$0")/.."
out=${1:-gpu_results}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
  if ! "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >> "$out/gpu_check.log" 2>&1; then
    echo "gpu_check: not started: installing the wheels in .whl/ failed (see $out/gpu_check.log)" >&2
    exit 2
  fi
  export PYTHONPATH=$PWD:/tmp/site
fi
exec "$python" scripts/gpu_check.py --out "$out" --budget "${GPU_CHECK_BUDGET_S:-480}" --started "$started"
