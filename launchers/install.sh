#!/usr/bin/env bash
# Creates ./.venv and installs fastclr for this machine.
#   bash launchers/install.sh           # what pretraining needs
#   bash launchers/install.sh --test    # that, plus the test runner (and Kornia, which the benchmark tests run), and
#                                       # as root on Debian/Ubuntu Slurm + munge for the real-cluster tests
#   bash launchers/install.sh --bench   # that, plus Kornia for the data benchmark's baseline
#   bash launchers/install.sh --test --no-slurm   # the test runner without Slurm (the GPU acceptance run's install)
# Device selection: automatic (an NVIDIA driver answering `nvidia-smi` → CUDA builds), or forced with
# FASTCLR_DEVICE=cpu | cuda12 | cuda13.
#   cpu:    torch==2.13.0 (CPU build; an unpinned torch pulls a multi-GB CUDA build) + DALI's CPU operators
#   cudaNN: torch==2.13.0 (the release the suite is tested with) built for CUDA NN, from PyTorch's own index for that
#           CUDA major version (TORCH_INDEX; cu128 builds for any CUDA 12 driver, cu130 for CUDA 13), brings triton;
#           + nvidia-dali-cudaNN0. A CPU build of torch already in .venv is removed first, not kept.
#           TORCH_SPEC overrides the pin (e.g. TORCH_SPEC="torch==2.7.1" for a driver older than CUDA 12.8's
#           minimum), TORCH_INDEX the index ("" = the default package index).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
no_slurm=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="$extras,test" ;;
    --bench) extras="$extras,bench" ;;
    --no-slurm) no_slurm=1 ;;
    *) echo "install.sh: unknown option '$arg' (use --test, --bench, --no-slurm)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}

# Debian/Ubuntu ship venv/ensurepip, the C++ compiler and Python headers separately; DeepSpeed JIT-compiles a small
# CPU communication op at first start and needs the last two.
need=()
$PY -c "import ensurepip, venv" 2>/dev/null || need+=("python3-venv")
command -v g++ >/dev/null 2>&1 || need+=("g++")
$PY - <<'PYEOF' 2>/dev/null || need+=("python3-dev")
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
PYEOF
# --test: Debian's Slurm (slurm-wlm 22.05) and munge, for the test suite's real two-node cluster on this machine
# (launchers/slurm/local_cluster.sh). Without root they are only suggested: those tests then skip, saying why.
slurm=()
if [[ ",$extras," == *,test,* ]] && [ "$no_slurm" = 0 ]; then
  command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 || slurm+=("slurm-wlm")
  command -v munged >/dev/null 2>&1 || slurm+=("munge")
  if [ ${#slurm[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      need+=("${slurm[@]}")
    else
      echo "install.sh: the real-Slurm tests will be skipped; as root, apt-get install ${slurm[*]} runs them" >&2
    fi
  fi
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install.sh: installing ${need[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "install.sh: please install these Debian/Ubuntu packages first: ${need[*]}" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || $PY -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel >/dev/null 2>&1 || true

device=${FASTCLR_DEVICE:-auto}
if [ "$device" = auto ]; then
  device=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n1)
    case "$major" in 12) device=cuda12 ;; 1[3-9]) device=cuda13 ;; *) echo "install.sh: CUDA $major unsupported, using CPU" >&2 ;; esac
  fi
fi
echo "install.sh: installing for $device"
TESTED_TORCH="torch==2.13.0"
case "$device" in
  cpu)    python -m pip install -q "$TESTED_TORCH" ;;
  cuda12|cuda13)
    # A torch already here that is not a CUDA build of this major version (a CPU build from an earlier CPU install,
    # or another CUDA major) would satisfy pip's requirement and stay: remove it first.
    want_major=${device#cuda}
    have=$(python -c "import torch; print(torch.version.cuda or 'cpu')" 2>/dev/null || echo none)
    if [ "$have" != none ] && [ "${have%%.*}" != "$want_major" ]; then
      echo "install.sh: replacing torch built for '$have' with a CUDA $want_major build"
      python -m pip uninstall -q -y torch
    fi
    index_default="https://download.pytorch.org/whl/cu128"
    [ "$device" = cuda13 ] && index_default="https://download.pytorch.org/whl/cu130"
    index=${TORCH_INDEX-$index_default}
    python -m pip install -q "${TORCH_SPEC:-$TESTED_TORCH}" ${index:+--index-url "$index"} ;;
  *) echo "install.sh: FASTCLR_DEVICE must be cpu, cuda12 or cuda13, got '$device'" >&2; exit 1 ;;
esac
python -m pip install -q -e ".[${device}${extras}]"
python -c "import torch, fastclr; print('install.sh: fastclr', fastclr.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
# A GPU the installed torch cannot use would train on the CPU at a fraction of the speed: stop here, naming it.
if [ "$device" != cpu ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "install.sh: error: nvidia-smi sees a GPU (driver CUDA ${major:-?}) but the installed torch cannot use it:" \
       "its CUDA runtime is newer than the driver. Set TORCH_SPEC to a torch built for this driver" \
       "(e.g. TORCH_SPEC=torch==2.7.1 for CUDA 12.6) and run again, or FASTCLR_DEVICE=cpu for the CPU." >&2
  exit 1
fi
