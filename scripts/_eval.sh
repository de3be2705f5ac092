# Sourced by the eval_aim_*f.sh scripts: run_published_eval FRAMES DATA MODEL [OUTPUT] [options...]
# compares baseline and aim_default with the local multiple-choice runner (resumable).
run_published_eval() {
  local frames="$1" data="${2:?DATA.jsonl required}" model="${3:?MODEL_DIR required}"
  local out="${4:-outputs/eval_${frames}f}"
  shift $(( $# < 4 ? $# : 4 ))
  exec python3 -m aim_llava.cli eval --data "$data" --model "$model" --frames "$frames" \
    --configs baseline,aim_default --output "$out" --resume --plot "$out/accuracy_vs_flops.png" "$@"
}
