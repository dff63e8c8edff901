#!/usr/bin/env bash
# The one GPU check: run it once on a machine with an NVIDIA GPU; it needs only a clone of this
# repository and the package registries (or, offline, an interpreter and a folder of wheels).
#
#   bash benchmarks/gpu_check.sh                          # online: makes .venv-gpucheck, installs, checks
#   bash benchmarks/gpu_check.sh --python PY --wheels DIR # offline: PY's packages + DIR's wheels only
#   bash benchmarks/gpu_check.sh --sd15 .bench_cache/sd15_dry_run   # also the real-size sd15 bundle
#
# Stages (budget in seconds; designed for 8 minutes on 16 cores + one H100), each under its own
# `timeout`, each writing its verdict to benchmarks/results/gpu_check.json as it ends:
#   env 150 (venv + install; skipped when .venv-gpucheck is already installed), doctor 20 (a real
#   CUDA and TensorRT session on a shipped graph, not the provider list), bundles 100 (tiny fp32 +
#   tiny fp16, the whole path, and a 4-shot lite bundle at --image-size 224 on the built-in textile
#   set), backends 110 (tiny fp16) + 40 (lite) (ORT CUDA, ORT TensorRT with engine files present,
#   native TensorRT; scores against the CPU within the bundle's tolerance), triton 15 (a --device
#   gpu repository's configs), gpu tests 45 (tests/test_gpu.py with O2N_REQUIRE_GPU=1: a skip fails).
#   Total 480 s. The sd15 stage (390 s) runs only with --sd15 and an existing dry-run folder.
# Every check ends PASSED, FAILED (reason) or NOT CHECKED (reason; never counted as passed).
# Exit: 0 every check passed; 1 a check failed or was not checked (named in the table); 2 no GPU
# visible (within seconds, nothing checked).
#
# Install notes (also for an offline box):
# - online, the check installs o2n-edge[build,gpu,trt,dev,demo] (never together with the CPU
#   `onnxruntime`: both packages install the same module and the CUDA provider goes missing).
# - tensorrt-cu12 on PyPI is an sdist: at install time it downloads its real wheels
#   (tensorrt_cu12_libs, tensorrt_cu12_bindings) from NVIDIA's index, pypi.nvidia.com; a box that
#   reaches only PyPI (or nothing) needs those wheels carried in the --wheels folder.
# - offline (--python PY --wheels DIR): a venv over PY's own packages (--system-site-packages:
#   torch and CUDA from the machine image), then only DIR's wheels (pip --no-index). Whatever is
#   missing (onnxruntime-gpu, tensorrt, cuda-python, tritonclient) is reported NOT CHECKED with the
#   reason; the torch stages (tiny and lite export, fp16 graphs) still run.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY_GIVEN="" WHEELS="" SD15=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY_GIVEN=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --sd15) SD15=$2; shift 2 ;;
    *) echo "gpu_check: unknown argument $1 (see the header of $0)" >&2; exit 64 ;;
  esac
done
if { [ -n "$PY_GIVEN" ] && [ -z "$WHEELS" ]; } || { [ -z "$PY_GIVEN" ] && [ -n "$WHEELS" ]; }; then
  echo "gpu_check: --python and --wheels go together (the offline mode)" >&2; exit 64
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi missing or failing): nothing was checked" >&2
  exit 2
fi
OUT=${OUT:-benchmarks/results}
RESULTS=$OUT/gpu_check.json
WORK=${WORK_DIR:-.gpu_check}
VENV=${VENV:-.venv-gpucheck}
LOG=$WORK/gpu_check.log
mkdir -p "$OUT" "$WORK"
rm -f "$RESULTS"
nvidia-smi -L
start=$(date +%s)
OFFLINE=()
[ -n "$WHEELS" ] && OFFLINE=(--offline)

say() { echo "gpu_check: $*" | tee -a "$LOG"; }
# a check recorded by this script (the stage itself could not: it never started, or was killed)
rec() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m benchmarks.gpu_check --results "$RESULTS" record "$@" \
          || python3 - "$RESULTS" "$@" <<'EOF'
import json, sys, pathlib
p = pathlib.Path(sys.argv[1]); a = sys.argv[2:]
kw = dict(zip(a[::2], a[1::2]))
doc = json.loads(p.read_text()) if p.is_file() else {"checks": {}}
if not ("--if-missing" in a and kw.get("--check") in doc["checks"]):
    doc["checks"][kw["--check"]] = {"status": kw["--status"], "reason": kw.get("--reason", "")}
p.write_text(json.dumps(doc, indent=2) + "\n")
EOF
}
# stage NAME BUDGET CMD...: run CMD under its budget; a timeout or a crash is recorded as NAME failed
stage() {
  local name=$1 budget=$2; shift 2
  local t0=$(date +%s) rc=0
  say "stage $name (budget ${budget} s)"
  timeout --kill-after=10 "$budget" "$@" >>"$LOG" 2>&1 || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    rec --check "$name" --status failed --reason "timed out after its ${budget} s budget (log: $LOG)"
  elif [ "$rc" != 0 ]; then
    rec --check "$name" --status failed --reason "exited $rc (log: $LOG)" --if-missing
  else
    rec --check "$name" --status passed --if-missing
  fi
  say "stage $name: exit $rc after $(( $(date +%s) - t0 )) s"
  return 0
}

# ---- env: the venv this check runs in
install_online() {
  [ -f "$VENV/.installed" ] && return 0
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q -U pip \
    && "$VENV/bin/pip" install -q -e ".[build,gpu,trt,dev,demo]" && touch "$VENV/.installed"
}
install_offline() {
  "$PY_GIVEN" -m venv --system-site-packages "$VENV" || return 1
  local pip=("$VENV/bin/pip" install -q --no-index --find-links "$WHEELS")
  # every carried wheel first (onnxruntime-gpu replaces a CPU onnxruntime: both cannot stay)
  if ls "$WHEELS"/onnxruntime_gpu-*.whl >/dev/null 2>&1; then "$VENV/bin/pip" uninstall -q -y onnxruntime || true; fi
  for w in "$WHEELS"/*.whl; do [ -e "$w" ] && { "${pip[@]}" --no-deps "$w" || say "could not install $w"; }; done
  "${pip[@]}" --no-build-isolation -e . || "${pip[@]}" --no-build-isolation --no-deps -e .
}
export VENV WHEELS PY_GIVEN LOG
export -f install_online install_offline say
if [ -n "$WHEELS" ]; then stage env 150 bash -c install_offline; else stage env 150 bash -c install_online; fi
PY="$VENV/bin/python"
if ! "$PY" -c "import o2n_edge" >/dev/null 2>&1; then
  rec --check env --status failed --reason "o2n-edge is not importable from $PY after the install (log: $LOG)"
  "$PY" -m benchmarks.gpu_check --results "$RESULTS" summary 2>/dev/null || cat "$RESULTS"
  exit 1
fi
GC=("$PY" -m benchmarks.gpu_check --results "$RESULTS" "${OFFLINE[@]}")

# ---- the checks
stage doctor 20 "${GC[@]}" doctor
EXPORT=("$VENV/bin/o2n-edge" export --category textile --dataset textile --runs-dir "$WORK/runs" --force --no-progress)
stage bundle:tiny-fp32 30 "${EXPORT[@]}" --profile tiny --shots 2 --pool-size 1 --personalize-steps 4 --distill-steps 1 \
  --out "$WORK/tiny-fp32"
stage bundle:tiny-fp16 35 "${EXPORT[@]}" --profile tiny --shots 2 --pool-size 1 --personalize-steps 4 --distill-steps 1 \
  --precision fp16 --out "$WORK/tiny-fp16"
stage bundle:lite 35 "${EXPORT[@]}" --profile lite --shots 4 --image-size 224 --out "$WORK/lite"
[ -f "$WORK/tiny-fp16/manifest.json" ] && stage backends:tiny 110 "${GC[@]}" backends --bundle "$WORK/tiny-fp16" --label tiny
[ -f "$WORK/lite/manifest.json" ] && stage backends:lite 40 "${GC[@]}" backends --bundle "$WORK/lite" --label lite
[ -f "$WORK/tiny-fp16/manifest.json" ] && stage triton 15 "${GC[@]}" triton --bundle "$WORK/tiny-fp16" --out "$WORK/triton"
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  stage gpu-tests 45 env O2N_REQUIRE_GPU=1 O2N_GPU_TINY="$ROOT/$WORK" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
else
  rec --check gpu-tests --status "not checked" --reason "pytest is not installed in $PY"
fi
if [ -n "$SD15" ]; then
  if [ -f "$SD15/bundles/fp16/manifest.json" ]; then
    stage backends:sd15 390 "${GC[@]}" backends --bundle "$SD15/bundles/fp16" --label sd15
  else
    rec --check backends:sd15 --status "not checked" --reason "$SD15/bundles/fp16 not found (python -m benchmarks.sd15_dry_run)"
  fi
fi
say "$(( $(date +%s) - start )) s in all; results in $RESULTS, log in $LOG"
"${GC[@]}" summary
