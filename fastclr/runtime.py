"""Process-level setup: which device this rank drives and the process group it belongs to.

``deepspeed launchers/pretrain.py`` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; ``python
launchers/pretrain.py`` sets nothing, so a one-process world is described here before DeepSpeed looks for it.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as the launcher (or Slurm, or nothing) describes them."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, local


_timeout: datetime.timedelta | None = None


class RunFailure(RuntimeError):
    """The run cannot go on, for a reason the message names, with the last complete checkpoint untouched; the entry
    point prints the message and exits with ``exit_code``."""

    exit_code = 1


def setup(backend: str = "auto", timeout: float | None = None) -> Runtime:
    """Pick the device, fill in a single-process environment if none was given, and initialise the process group.

    ``timeout`` (seconds, ``distributed.timeout``): how long any collective of the default group waits for the other
    ranks before it raises. None keeps DeepSpeed's default (10 minutes, or $DEEPSPEED_TIMEOUT minutes).
    """
    global _timeout
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world, local = world_from_env()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: let cuDNN time its algorithms once
    else:
        device = torch.device("cpu")
        # Every rank's intra-op pool defaults to all cores: K ranks on one machine would run K× oversubscribed (we
        # measured a 2-rank run 20× slower than one rank that way). Split the cores unless the user chose.
        if "OMP_NUM_THREADS" not in os.environ:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 0))) or min(world, os.cpu_count() or 1)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    import deepspeed  # imported here: pulling DeepSpeed in is seconds, and config errors must come first

    if not torch.distributed.is_initialized():
        # DeepSpeed 0.19 hands ``timeout`` to torch.distributed.init_process_group unchanged (comm/torch.py), where it
        # bounds the rendezvous and every collective of the group; gloo then raises "Timed out waiting <ms> for recv"
        # on a peer that stopped answering instead of blocking forever.
        _timeout = datetime.timedelta(seconds=timeout) if timeout else None
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **({"timeout": _timeout} if _timeout else {}))
    return Runtime(rank=rank, world_size=world, local_rank=local, device=device)


def collective_timeout() -> datetime.timedelta | None:
    """The default group's timeout as :func:`setup` set it (None: DeepSpeed's default). ``new_group`` does not inherit
    it (torch 2.13 gives a new group the backend's default, 30 minutes for gloo): pass it to every group made later."""
    return _timeout


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def teardown() -> None:
    """Destroy the process group at exit (NCCL warns of leaked communicators otherwise; gloo closes its sockets)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class DeviceError(RuntimeError):
    """The machine has a GPU this torch cannot use; the message names the mismatch."""


def check_gpu_usable() -> None:
    """A GPU that ``nvidia-smi`` sees but torch cannot use (a CPU build of torch, or a driver older than torch's CUDA
    runtime) would silently train on the CPU at a hundredth of the speed: stop instead, unless FASTCLR_DEVICE=cpu
    asks for the CPU on purpose."""
    import shutil
    import subprocess

    if torch.cuda.is_available() or os.environ.get("FASTCLR_DEVICE") == "cpu" or not shutil.which("nvidia-smi"):
        return
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return
    gpus = [line.strip() for line in smi.stdout.splitlines() if line.strip()]
    if smi.returncode == 0 and gpus:
        raise DeviceError(
            f"nvidia-smi sees {len(gpus)} GPU(s) ({gpus[0]}) but torch {torch.__version__} cannot use them "
            f"(torch.version.cuda={torch.version.cuda}): a CPU build of torch, or a driver older than torch's CUDA "
            "runtime. Reinstall with `FASTCLR_DEVICE=cuda12 bash launchers/install.sh` (cuda13 for CUDA 13 drivers; "
            "TORCH_SPEC=... for an older driver), or set FASTCLR_DEVICE=cpu to train on the CPU on purpose.")

