#!/usr/bin/env bash
# Regenerate requirements/vllm.txt, the lock of the vLLM plugin's test environment (.venv-vllm,
# scripts/run_vllm_tests.sh), from pyproject.toml's requirements and requirements/vllm.in.
# Unlike scripts/update_lock.sh (pip-tools) this uses uv's resolver, because the lock must
# override one dependency's pin (requirements/vllm-overrides.txt says why), which pip-compile
# cannot. Versions are resolved for Linux x86_64 (manylinux 2.28) and CPython 3.11, as CI.
# The main lock files (requirements/dev.txt, runtime.txt) are not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install -q --disable-pip-version-check uv==0.13.8
"$tools/bin/uv" pip compile -q --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --override requirements/vllm-overrides.txt --no-emit-package aim-llava \
  --custom-compile-command "bash scripts/update_vllm_lock.sh" \
  pyproject.toml requirements/vllm.in -o requirements/vllm.txt "$@"
echo "wrote requirements/vllm.txt"
