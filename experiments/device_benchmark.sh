#!/usr/bin/env bash
# One accelerator, one script: ResNet-18 (CIFAR shape, batch 128) at T=4 and T=8, images/s
# and XLA's compiled memory of rate-BP, BPTT, BPTT-remat and spike inference, in both step
# modes, in float32 and bfloat16. Meant to finish in under 8 minutes on one GPU (32
# compilations and 5 timed rounds each; 200 s on one H200, docs/RESULTS.md's GPU section);
# --smoke runs the same path on CPU at a tiny size.
#
#   bash experiments/device_benchmark.sh [--smoke] [--out DIR]     (default DIR: device_benchmark)
#
# Writes DIR/bench_float32.json, DIR/bench_bfloat16.json (benchmark.py's rows) and
# DIR/device_benchmark.json (the table printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
out=device_benchmark
smoke=0
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --out) out=${2:?--out needs a directory}; shift ;;
    *) echo "error: unknown argument $1 (allowed: --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$smoke" = 1 ]; then
  size=(--model resnet18_tiny --batch 4 --image-size 8 --T 2 --repeats 1)
  batch=4
else
  size=(--model resnet18 --batch 128 --image-size 32 --T 4 8 --repeats 5)
  batch=128
fi
mkdir -p "$out"
start=$SECONDS
for dtype in float32 bfloat16; do
  "$python" experiments/benchmark.py "${size[@]}" --methods bptt bptt_remat rate \
    --step-modes multi single --dtype "$dtype" --json "$out/bench_$dtype.json"
done
"$python" experiments/backend/device_report.py "$out/bench_float32.json" \
  "$out/bench_bfloat16.json" --batch "$batch" --json "$out/device_benchmark.json"
echo "device benchmark done in $((SECONDS - start)) s; results in $out/"
