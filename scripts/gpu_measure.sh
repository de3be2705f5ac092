#!/usr/bin/env bash
# The GPU measurements that docs/benchmarks.md lists as not measured yet, one phase per run, on
# this machine's GPU (torch, transformers and pytest needed; wheels kept in .whl/, from
# scripts/fetch_gpu_wheels.sh for a machine without network access, are installed first).
#
#   bash scripts/gpu_measure.sh PHASE [OUTDIR]
#   PHASE: tests | kernels | prefill | prefill-kernels | decode | decode-eager | video | serve
#
# Logs and JSON reports go to OUTDIR (default: gpu_results/).
set -euo pipefail
cd "$(dirname "$0")/.."
phase=${1:?"usage: gpu_measure.sh tests|kernels|prefill|prefill-kernels|decode|decode-eager|video|serve [OUTDIR]"}
out=${2:-gpu_results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$out/machine_$phase.txt"

bench() {  # bench NAME ARGS...: one bench run, its table in NAME.log and its report in NAME.json;
           # a failed run is listed in failures.txt and the phase goes on with the next one
  local name=$1; shift
  if ! python3 -m aim_llava.cli bench --device cuda --dtype bfloat16 --json "$out/$name.json" "$@" 2>&1 \
      | tee "$out/$name.log"; then
    echo "$name failed: see $name.log" | tee -a "$out/failures.txt"
  fi
}
all_presets=baseline,aim_default,aim_merge_only,aim_prune_only,aim_default_mask,budget:0.15,fastv_budget15,pool_12

case $phase in
  tests)  # sync-free prefill, flex == chunked, graph == eager, no math-kernel fallback
    python3 -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$out/tests_gpu.log" ;;
  kernels)  # the importance kernels alone: 7B's heads, 32 / 192 frames of aim_default, 192 of aim_prune_only
    python3 scripts/bench_importance.py --device cuda --tokens 1769,6373,9609,37732 --json "$out/kernels.json" \
      --fused-tilings 128x64x8x3,128x32x4x3,64x32x4x2,64x64x4x2,128x128x8x2 2>&1 \
      | tee "$out/kernels.log" ;;
  prefill)  # issue 11's table: 7B, 32 and 192 frames, every preset
    for frames in 32 192; do
      bench "prefill_7b_${frames}f" --arch llava-onevision-qwen2-7b --frames "$frames" --repeats 5 --decode-tokens 16 \
        --configs "$all_presets"
    done ;;
  prefill-kernels)  # aim_default with each CUDA importance kernel inside a real prefill (flex compiles
                    # two graphs per length bucket: minutes on its first call at each frame count)
    kernel_configs=aim_default
    for kernel in chunked flex; do
      sed "s/^name: aim_default$/name: aim_default_$kernel/" configs/aim_default.yaml > "/tmp/aim_default_$kernel.yaml"
      echo "importance_kernel: $kernel" >> "/tmp/aim_default_$kernel.yaml"
      kernel_configs+=",/tmp/aim_default_$kernel.yaml"
    done
    for frames in 32 192; do
      bench "prefill_kernels_7b_${frames}f" --arch llava-onevision-qwen2-7b --frames "$frames" --repeats 5 \
        --decode-tokens 16 --configs "$kernel_configs"
    done ;;
  decode|decode-eager)  # issue 12's table: tokens/s at batch 1, 4 and 16, CUDA graphs (or not)
    graph=(); [[ $phase == decode-eager ]] && graph=(--no-cuda-graph)
    for arch in llava-onevision-qwen2-7b llava-onevision-qwen2-0.5b; do
      for batch in 1 4 16; do
        bench "${phase}_${arch#llava-onevision-qwen2-}_b${batch}" --arch "$arch" --frames 32 --repeats 3 \
          --decode-tokens 128 --batch "$batch" --configs baseline,aim_default "${graph[@]}"
      done
    done ;;
  video)  # issue 13: time to first token from a 60 s 640x360 clip, per reader
    python3 scripts/make_sample_video.py /tmp/clip60.mp4 --frames 1800 --fps 30 --width 640 --height 360 --gop 250
    for backend in pyav decord; do
      bench "video_${backend}" --arch llava-onevision-qwen2-7b --frames 32 --repeats 5 --video /tmp/clip60.mp4 \
        --backend "$backend" --configs baseline,aim_default
    done ;;
  serve)  # issue 14: server throughput on the 7B architecture (a random bf16 checkpoint written here, ~16 GB)
    python3 scripts/make_tiny_model.py --arch llava-onevision-qwen2-7b --out /tmp/random-7b
    for config in baseline aim_default; do
      python3 scripts/bench_serve.py --model /tmp/random-7b --device cuda --frames 32 --max-tokens 64 \
        --requests 32 --clients 1,16 --batch-size 16 --config "$config" 2>&1 | tee "$out/serve_$config.log"
    done ;;
  *) echo "unknown phase '$phase': use tests, kernels, prefill, prefill-kernels, decode, decode-eager, video or serve" >&2
     exit 2 ;;
esac
