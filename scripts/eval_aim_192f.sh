#!/usr/bin/env bash
# Multiple-choice video QA at 192 frames, baseline against aim_default (the published setting).
#   scripts/eval_aim_192f.sh DATA.jsonl MODEL_DIR [OUTPUT_DIR] [extra aim-llava eval options]
# Several GPUs: torchrun --nproc_per_node N -m aim_llava.cli eval ... (the same options).
set -euo pipefail
data="${1:?usage: scripts/eval_aim_192f.sh DATA.jsonl MODEL_DIR [OUTPUT_DIR]}"
model="${2:?usage: scripts/eval_aim_192f.sh DATA.jsonl MODEL_DIR [OUTPUT_DIR]}"
out="${3:-outputs/eval_192f}"
shift $(( $# < 3 ? $# : 3 ))
exec python3 -m aim_llava.cli eval --data "$data" --model "$model" --frames 192 \
  --configs baseline,aim_default --output "$out" --resume --plot "$out/accuracy_vs_flops.png" "$@"
