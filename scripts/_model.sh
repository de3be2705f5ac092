# Sourced by the caption/QA scripts: pick_model [MODEL_DIR] prints the checkpoint directory to use.
# Without an argument it takes the first checkpoint under $AIM_LLAVA_MODEL_ROOT (default: model/);
# with none there it writes the tiny random checkpoint and says so on stderr.
pick_model() {
  local given="${1:-}"
  local root="${AIM_LLAVA_MODEL_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/model}"
  if [[ -n "$given" ]]; then
    echo "$given"
    return
  fi
  local found
  found="$(find "$root" -mindepth 2 -maxdepth 2 -name config.json -not -path "*/tiny-random-*" 2>/dev/null | sort | head -n 1)"
  if [[ -n "$found" ]]; then
    dirname "$found"
    return
  fi
  local tiny="$root/tiny-random-llava-qwen"
  if [[ ! -f "$tiny/config.json" ]]; then
    python3 "$(dirname "${BASH_SOURCE[0]}")/make_tiny_model.py" --out "$tiny" >&2
  fi
  echo "NOTE: no checkpoint in $root, using a tiny model with RANDOM weights: its output is random text," \
       "not a real caption. Put a real checkpoint in model/ (see model/README.md) or pass MODEL_DIR." >&2
  echo "$tiny"
}
