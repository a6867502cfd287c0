#!/usr/bin/env bash
# Creates ./.venv and installs fastclr for this machine.
#   bash launchers/install.sh           # what pretraining needs
#   bash launchers/install.sh --test    # that, plus the test runner (and Kornia, which the benchmark tests run), and
#                                       # as root on Debian/Ubuntu Slurm + munge for the real-cluster tests
#   bash launchers/install.sh --bench   # that, plus Kornia for the data benchmark's baseline
# Device selection: automatic (an NVIDIA driver answering `nvidia-smi` → CUDA builds), or forced with
# FASTCLR_DEVICE=cpu | cuda12 | cuda13.
#   cpu:    torch==2.13.0 (CPU build; an unpinned torch pulls a multi-GB CUDA build) + DALI's CPU operators
#   cudaNN: PyPI's CUDA build of torch (brings triton) + nvidia-dali-cudaNN0 for the driver's CUDA major version
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="$extras,test" ;;
    --bench) extras="$extras,bench" ;;
    *) echo "install.sh: unknown option '$arg' (use --test and/or --bench)" >&2; exit 2 ;;
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
if [[ ",$extras," == *,test,* ]]; then
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
case "$device" in
  cpu)    python -m pip install -q "torch==2.13.0" ;;
  # PyPI's Linux torch wheel is a CUDA build carrying its own CUDA runtime; a driver older than that runtime needs
  # TORCH_SPEC pointing at an older torch release (e.g. TORCH_SPEC="torch==2.7.1" for CUDA 12.6 drivers).
  cuda12|cuda13) python -m pip install -q "${TORCH_SPEC:-torch}" ;;
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
