#!/usr/bin/env bash
# The GPU acceptance run, one command on a machine with one CUDA GPU:
#   bash benchmarks/gpu_acceptance.sh [RESULTS_DIR] [--skip STAGE ...] [--budget-s SECONDS]
# Installs for CUDA unless the interpreter already has a CUDA torch, then runs the CUDA-only tests and the quick
# benchmark suite on the GPU (benchmarks/gpu_acceptance.py) and writes one results folder with a summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu-acceptance-$(date +%Y%m%dT%H%M%S)}
[ $# -gt 0 ] && shift
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
if ! { [ -x "$py" ] || command -v "$py" >/dev/null; } || ! "$py" -c "import torch, fastclr; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_acceptance: installing for CUDA (log: $out/install.log)"
  if ! bash launchers/install.sh --test --bench >"$out/install.log" 2>&1; then
    tail -5 "$out/install.log" >&2
    echo "gpu_acceptance: error: the CUDA install failed (see $out/install.log)" >&2
    exit 1
  fi
  py=.venv/bin/python
fi
exec "$py" -m benchmarks.gpu_acceptance --out "$out" "$@"
