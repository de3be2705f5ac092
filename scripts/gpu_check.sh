#!/usr/bin/env bash
# One call on the GPU machine that answers the open GPU questions within a time budget (default
# 480 s, GPU_CHECK_BUDGET_S), installing the carried wheels first (.whl/, from
# `bash scripts/fetch_gpu_wheels.sh check`: PyAV for the video phase) on the same clock. Phases and
# what they measure: scripts/gpu_check.py. Summary and log in OUTDIR (default: $OUT, else gpu_results/):
#
#   bash scripts/gpu_check.sh [OUTDIR]
set -uo pipefail
started=$(date +%s.%N)
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >> "$out/gpu_check.log" 2>&1; then
    export PYTHONPATH=$PWD:/tmp/site
  else
    echo "installing the carried wheels failed: see gpu_check.log" >&2
  fi
fi
exec python3 scripts/gpu_check.py --out "$out" --budget "${GPU_CHECK_BUDGET_S:-480}" --started "$started"
