#!/usr/bin/env bash
# Download, where pip reaches a package index, the wheels that a GPU machine without network access
# needs for scripts/gpu_measure.sh beyond torch, transformers and pytest: the video readers (PyAV,
# decord), qwen-vl-utils, and the server with the openai client its benchmark drives (FastAPI,
# uvicorn, pydantic and what they need), for Python 3.12 on x86-64. They land in .whl/ (about
# 60 MB), which git ignores; copy that folder into the checkout on the GPU machine, where
# gpu_check.sh and gpu_measure.sh install it first.
#
#   bash scripts/fetch_gpu_wheels.sh [all|check]
#
# `check`: only what scripts/gpu_check.sh needs (PyAV, ~35 MB), after emptying .whl/.
set -euo pipefail
set_name=${1:-all}
cd "$(dirname "$0")/.."
[[ $set_name == check ]] && rm -rf .whl
mkdir -p .whl
mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux2010_x86_64
           manylinux1_x86_64)
serve=(fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.3 pydantic-core==2.50.4
       annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 opentelemetry-api==1.45.2
       openai==3.54.0 jiter==0.19.0 sniffio==1.3.1 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5)
case $set_name in
  all) wheels=(av==19.0.2 decord==0.6.0 qwen-vl-utils==0.0.14 "${serve[@]}") ;;
  check) wheels=(av==19.0.2) ;;
  *) echo "unknown wheel set '$set_name': use all or check" >&2; exit 2 ;;
esac
for wheel in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]/#/--platform=}" -d .whl "$wheel"
done
ls -l .whl
