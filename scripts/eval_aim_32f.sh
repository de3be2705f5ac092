#!/usr/bin/env bash
# Multiple-choice video QA at 32 frames, baseline against aim_default (the published setting).
#   scripts/eval_aim_32f.sh DATA.jsonl MODEL_DIR [OUTPUT_DIR] [extra aim-llava eval options]
# Several GPUs: torchrun --nproc_per_node N -m aim_llava.cli eval ... (the same options).
set -euo pipefail
source "$(dirname "$0")/_eval.sh"
run_published_eval 32 "$@"
