#!/usr/bin/env bash
# The GPU acceptance run, one command on a machine with one CUDA GPU, 8 minutes including the install:
#   bash benchmarks/gpu_acceptance.sh [RESULTS_DIR] [--skip STAGE ...] [--python PY] [--dry-run]
# Stages (install, env, kernel-tests, cuda-tests, benchmarks), each with its own time budget and killed at its limit
# with its results kept; a summary table last (benchmarks/gpu_acceptance.py). The driver needs only the standard
# library, so it runs on the system Python and times the install it starts.
set -uo pipefail
cd "$(dirname "$0")/.."
args=()
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  args+=(--out "$1")
  shift
fi
exec "${PYTHON:-python3}" -m benchmarks.gpu_acceptance "${args[@]}" "$@"
