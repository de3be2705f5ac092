#!/usr/bin/env bash
# Ask about a video:  scripts/qa_video.sh VIDEO "QUESTION" [MODEL_DIR] [aim-llava options]
set -euo pipefail
source "$(dirname "$0")/_model.sh"
video="${1:?usage: scripts/qa_video.sh VIDEO QUESTION [MODEL_DIR] [aim-llava options]}"
question="${2:?usage: scripts/qa_video.sh VIDEO QUESTION [MODEL_DIR] [aim-llava options]}"
shift 2
model_arg=""
if [[ $# -gt 0 && "$1" != --* ]]; then model_arg="$1"; shift; fi
model="$(pick_model "$model_arg")"
exec python3 -m aim_llava.cli ask "$video" "$question" --model "$model" "$@"
