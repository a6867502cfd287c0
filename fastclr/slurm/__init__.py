"""Slurm: from the SLURM_* environment to a DeepSpeed world, the launch command, and the requeue call.

    python -m fastclr.slurm plan [--dry-run] [--recipe R] [--mode rank|deepspeed] [key=value ...]   # batch shell
    python -m fastclr.slurm exec --mode M --gpus-per-node G --master-port P --master-addr A -- SCRIPT [ARGS ...]
    python -m fastclr.slurm progress --since T [--recipe R] [key=value ...]   # after a failed start: a new checkpoint?

``plan`` runs once in the batch script: it resolves the node list, ranks and master address/port, checks the recipe
against that world size, prints all of it and replaces itself with ``srun``. ``srun`` starts ``exec`` in every task;
``exec`` turns the task's SLURM_* variables into what the trainer reads and replaces itself with the trainer (mode
``rank``) or with DeepSpeed's launcher (mode ``deepspeed``). Both steps ``exec``, so no Python process is left in
between to swallow a signal or an exit status.

Launch modes
------------
``rank`` (default): one Slurm task per GPU, ``srun --ntasks-per-node=G``; each task gets RANK=SLURM_PROCID,
LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS and runs ``python launchers/pretrain.py``. Chosen because:

* Signals. slurmstepd delivers ``--signal=USR1@T``, preemption's SIGTERM and ``scancel --signal`` to every process of
  the step. Here those processes are exactly the trainer ranks, so each one checkpoints on its own handler. With the
  DeepSpeed launcher in between (``deepspeed.launcher.runner`` → ``deepspeed.launcher.launch`` → ranks, DeepSpeed
  0.19.8), neither launcher handles SIGUSR1 (default action: terminate), so the signal that asks for a checkpoint
  would kill the launchers and Slurm would then reap the ranks mid-write; and ``launch.py`` answers SIGTERM by
  terminating its children's trees (SIGKILL after 30 s) and exiting 1, not the trainer's 3.
* Exit status. ``srun`` returns the highest task exit status, so the trainer's 3 ("preempted, checkpoint written")
  reaches the batch script unchanged.
* No hostfile, no ssh, one process fewer per GPU, and Slurm's accounting and cgroups see the real ranks.

``deepspeed``: one task per node running DeepSpeed's launcher with ``--no_ssh --node_rank=SLURM_NODEID`` and a
hostfile written on the node, i.e. exactly what ``deepspeed launchers/pretrain.py`` does on one machine, repeated on
every node. To make it preemption-safe, ``exec`` blocks SIGUSR1 before starting the launcher: a blocked signal stays
pending through ``exec`` and ``fork``, so the launchers never act on it while the trainer, which unblocks it once its
own handler is installed, still receives it — even one sent during start-up. SIGTERM still goes through
``launch.py``'s handler (see above).

``plan`` also decides where rank 0 listens (the first node's name, or its NodeAddr from ``scontrol show node`` when
the name does not resolve) and gives ``srun`` ``--wait=<distributed.timeout>``: once one task has ended, a peer that
hangs is killed that much later instead of holding the allocation.
"""
from __future__ import annotations

from .launch import (DEFAULT_MODE, MODES, PRETRAIN_SCRIPT, deepspeed_command, describe, launch_command,
                     node_address, rank_env, requeue, task_command, trainer_args)
from .world import (SlurmError, SlurmWorld, default_master_port, expand_nodelist, hostfile_text, parse_gpu_count)

__all__ = ["DEFAULT_MODE", "MODES", "PRETRAIN_SCRIPT", "SlurmError", "SlurmWorld",
           "default_master_port", "deepspeed_command", "describe", "expand_nodelist", "hostfile_text", "launch_command",
           "node_address", "parse_gpu_count", "rank_env", "requeue", "task_command", "trainer_args"]
