"""Run a function on K gloo ranks in fresh processes and collect each rank's return value."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastclr.runtime import free_port


def _entry(rank, world, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args):
    """``fn(rank, world, *args)`` on ``world`` processes (module-level fn, picklable args); list of results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world, free_port(), out_dir, fn, args), nprocs=world, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world)]
