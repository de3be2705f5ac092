#!/usr/bin/env bash
# Caption a video:  scripts/caption_video.sh VIDEO [MODEL_DIR] [aim-llava options, e.g. --frames 16 --json]
set -euo pipefail
source "$(dirname "$0")/_model.sh"
video="${1:?usage: scripts/caption_video.sh VIDEO [MODEL_DIR] [aim-llava options]}"
shift
model_arg=""
if [[ $# -gt 0 && "$1" != --* ]]; then model_arg="$1"; shift; fi
model="$(pick_model "$model_arg")"
exec python3 -m aim_llava.cli caption "$video" --model "$model" "$@"
