#!/usr/bin/env bash
# Create .venv (once) and install the package with its test dependencies, at the versions of the
# lock (requirements/dev.txt), so a fresh machine gets what CI tested. torch 2.14.1 / torchvision
# 0.29.1 are pinned there (requirements/constraints.in says why).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [[ "$(uname -s)/$(uname -m)" == Linux/x86_64 ]]; then
  # Exactly what CI tested (scripts/update_lock.sh writes the lock from pyproject.toml's ranges).
  "${pip[@]}" -r requirements/dev.txt
  "${pip[@]}" --no-deps -e .
else
  echo "note: requirements/dev.txt is resolved for Linux x86_64; installing from pyproject.toml's ranges" >&2
  "${pip[@]}" -c requirements/constraints.in -e ".[dev]"
fi

# System packages, with apt as root: FFmpeg's shared libraries, which torchcodec (an optional
# video reader) loads, and Chromium, in which the demo's browser test runs (Playwright drives it;
# it downloads no browser of its own).
apt_install() {
  timeout 600 apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
    || { timeout 300 apt-get update -q >/dev/null 2>&1 \
         && timeout 600 apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; }
}
if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
  if ! ldconfig -p | grep -q "libavcodec\.so"; then
    apt_install libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8 \
      || echo "note: FFmpeg's shared libraries could not be installed: the torchcodec reader stays unusable" >&2
  fi
  if ! command -v chromium >/dev/null; then
    apt_install chromium || echo "note: Chromium could not be installed: the demo's browser test is skipped" >&2
  fi
fi
