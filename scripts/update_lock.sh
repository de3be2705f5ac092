#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml with pip-tools' pip-compile:
#   requirements/dev.txt      what scripts/install.sh (the README's commands and CI) installs
#   requirements/runtime.txt  the plain runtime install (no extras)
# Existing pins are kept where pyproject.toml still allows them; pass --upgrade to move every
# package to the newest version its range allows (try scripts/check_latest.sh first).
# Versions are resolved for this platform (Linux x86_64, CPython 3.11, as CI).
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install -q --disable-pip-version-check pip-tools==7.6.2
compile() {
  CUSTOM_COMPILE_COMMAND="bash scripts/update_lock.sh" \
  "$tools/bin/pip-compile" -q --strip-extras --no-emit-index-url --no-emit-find-links \
    --unsafe-package aim-llava \
    -c requirements/constraints.in "$@" pyproject.toml
}
compile --extra dev -o requirements/dev.txt "$@"
compile -o requirements/runtime.txt "$@"
echo "wrote requirements/dev.txt and requirements/runtime.txt"
