#!/usr/bin/env bash
# `make gpu-check`: the GPU checks for a short-lived machine with one CUDA GPU, torch and triton
# already installed and no network. Nothing is installed from a registry: the extension is built
# for the local GPU's architecture only (--no-deps, no build isolation), then the GPU tests (-m gpu) and
# a GPU benchmark of every family (cuda and triton backends vs torch eager and torch.compile) run.
# Logs and JSON go to $RESULTS (default bench/results/). Without a GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$RESULTS"
log() { echo "[gpu-check $(date +%H:%M:%S)] $*" | tee -a "$RESULTS/gpu-check.log"; }

arch=$("$PYTHON" - <<'PY'
import torch
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"{major}.{minor}")
PY
)
if [ -z "$arch" ]; then
    log "no CUDA device visible (torch $("$PYTHON" -c 'import torch; print(torch.__version__)')): nothing to check"
    exit 0
fi
log "device: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())'), sm_${arch/./}, $(nproc) cores"

log "build for TORCH_CUDA_ARCH_LIST=$arch"
if ! TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) DLK_CUDA=1 \
        "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . > "$RESULTS/gpu-build.log" 2>&1; then
    log "build FAILED, see $RESULTS/gpu-build.log"; tail -20 "$RESULTS/gpu-build.log"; exit 1
fi
"$PYTHON" -m dlkernels 2>&1 | tee "$RESULTS/gpu-selfcheck.log"

status=0
log "GPU tests of every family (pytest -m gpu)"
"$PYTHON" -m pytest -q -p no:cacheprovider tests -m gpu \
    2>&1 | tee "$RESULTS/gpu-tests.log" | tail -15 || status=1

# One run per dlkernels backend; torch's contenders are the same in both, so only the first
# compiles them. Default allocator only (the reuse setting is a CPU matter). The timeouts keep the
# whole check under 8 minutes; each family's results are written as soon as it finishes.
log "benchmark: cuda backend (with torch.compile)"
DLK_BACKEND=cuda timeout 200 "$PYTHON" -m bench --device cuda --alloc default --out "$RESULTS/gpu-cuda" \
    > "$RESULTS/gpu-bench-cuda.log" 2>&1 || status=1
log "benchmark: triton backend"
DLK_BACKEND=triton timeout 100 "$PYTHON" -m bench --device cuda --alloc default --no-compile \
    --out "$RESULTS/gpu-triton" > "$RESULTS/gpu-bench-triton.log" 2>&1 || status=1
grep -hE "^default" "$RESULTS"/gpu-bench-*.log | grep dlkernels
log "done (status $status); logs and JSON in $RESULTS"
exit $status
