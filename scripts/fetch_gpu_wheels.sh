#!/usr/bin/env bash
# Download (here, where pip reaches a package index) the wheels that the GPU machine lacks for
# scripts/gpu_measure.sh: the video readers (PyAV, decord) and qwen-vl-utils, for its Python 3.12
# on x86-64. They land in .whl/ (about 48 MB), which git ignores; carry that folder along.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux2010_x86_64
           manylinux1_x86_64)
for wheel in av==19.0.2 decord==0.6.0 qwen-vl-utils==0.0.14; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]/#/--platform=}" -d .whl "$wheel"
done
ls -l .whl
