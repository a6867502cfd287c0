"""Process-level setup: which device this rank drives and the process group it belongs to.

``deepspeed launchers/pretrain.py`` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; ``python
launchers/pretrain.py`` sets nothing, so a one-process world is described here before DeepSpeed looks for it.
"""
from __future__ import annotations

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


def setup(backend: str = "auto") -> Runtime:
    """Pick the device, fill in a single-process environment if none was given, and initialise the process group."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world, local = world_from_env()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
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
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return Runtime(rank=rank, world_size=world, local_rank=local, device=device)


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
