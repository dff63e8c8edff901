#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on one NVIDIA GPU): run it once on any machine with a GPU to
# verify the whole GPU path of the sd15 dry-run bundle.
#   1. `o2n-edge doctor` (execution install), 2. TensorRT engines for the bundle (build-engines,
#   TensorRT 10 or 11), 3. the bundle on ORT CUDA, ORT TensorRT (EP caches beside the engines) and
#   the native engines, scores compared with the CPU dry run, 4. the gpu-marked tests.
# Results: benchmarks/results/gpu_check.{json,md}; log: $WORK/gpu_check.log.
# Needs: the dry run's work folder ($WORK, default .bench_cache/sd15_dry_run, from
# `python -m benchmarks.sd15_dry_run`) and an install with o2n-edge[build,gpu,trt,dev].
# Exits 2 at once, checking nothing, when no NVIDIA GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-.bench_cache/sd15_dry_run}
BUNDLE=${BUNDLE:-fp16}
OUT=${OUT:-benchmarks/results}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi missing or failing): nothing was checked" >&2
  exit 2
fi
for need in "$WORK/bundles/$BUNDLE/manifest.json" "$WORK/stages/runtime_$BUNDLE.json"; do
  if [ ! -f "$need" ]; then
    echo "gpu_check: $need not found: run 'python -m benchmarks.sd15_dry_run' first (or copy its work folder here)" >&2
    exit 2
  fi
done
nvidia-smi -L
start=$(date +%s)
status=0
.venv/bin/o2n-edge doctor || status=1
# 6.5 minutes for engines + three backends, the rest for the gpu-marked tests
timeout 390 "$PY" -m o2n_edge.bench.gpu_check --bundle "$WORK/bundles/$BUNDLE" \
  --cpu-stage "$WORK/stages/runtime_$BUNDLE.json" --data "$WORK/data" --out "$OUT" || status=1
timeout 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py || status=1
echo "gpu_check: $(( $(date +%s) - start )) s, exit $status (results in $OUT/gpu_check.md)"
exit $status
