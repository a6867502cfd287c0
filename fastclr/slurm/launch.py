"""Commands: the ``srun`` line of the batch script, what each task replaces itself with, the requeue call, and
the human-readable plan."""
from __future__ import annotations

import logging
import math
import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import replace
from typing import Callable, Mapping, Sequence

from .world import SlurmError, SlurmWorld, hostfile_text

log = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN_SCRIPT = os.path.join(ROOT, "launchers", "pretrain.py")
STAGE_SCRIPT = os.path.join(ROOT, "launchers", "stage.py")
TASKS = ("pretrain", "linear", "finetune", "distill")
"""What a job runs: pretraining (``launchers/pretrain.py``) or a stage after it from a SOURCE (``launchers/stage.py``)."""
DEFAULT_RECIPE = os.path.join(ROOT, "launchers", "configs", "default.yaml")
MODES = ("rank", "deepspeed")
DEFAULT_MODE = "rank"


# --------------------------------------------------------------------------------------------------------------- #
# Commands


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise SlurmError(f"mode '{mode}' is unknown; choose one of {MODES}")


def trainer_args(recipe: str | None = None, overrides: Sequence[str] = (), script: str = PRETRAIN_SCRIPT,
                 task: str = "pretrain", source: str | None = None) -> list[str]:
    """What follows ``python`` (or DeepSpeed's launcher) on every rank: ``script`` for pretraining, else
    ``launchers/stage.py TASK SOURCE``."""
    if task not in TASKS:
        raise SlurmError(f"task '{task}' is unknown; choose one of {TASKS}")
    if task != "pretrain" and not source:
        raise SlurmError(f"task '{task}' needs a source (--source): the checkpoint or classifier.pt it starts from")
    head = [script] if task == "pretrain" else [STAGE_SCRIPT, task, source]
    return head + (["--config", recipe] if recipe else []) + list(overrides)


def launch_command(world: SlurmWorld, recipe: str | None = None, overrides: Sequence[str] = (),
                   mode: str = DEFAULT_MODE, script: str = PRETRAIN_SCRIPT, python: str = sys.executable,
                   wait_s: float | None = None, task: str = "pretrain", source: str | None = None) -> list[str]:
    """The ``srun`` command the batch script runs: one task per rank (mode rank) or per node (mode deepspeed).
    ``wait_s`` (the recipe's distributed.timeout): how long the other tasks may run on once one has ended."""
    _check_mode(mode)
    per_node = world.gpus_per_node if mode == "rank" else 1
    cpus = world.cpus_per_task if mode == "rank" else (
        world.cpus_per_task * (world.tasks_per_node or 1) if world.cpus_per_task else None)
    cmd = ["srun", f"--nodes={world.num_nodes}", f"--ntasks={world.num_nodes * per_node}",
           f"--ntasks-per-node={per_node}",
           # block: task i·G+j on node i, the layout `plan` prints and `exec` checks.
           "--distribution=block",
           # Rank 0 calls `scontrol requeue` after every rank has exited its checkpoint's last barrier with 3; a
           # peer that exits 3 first must not get rank 0 killed before that call. A crashed rank still ends the
           # step: its peers fail their next collective.
           "--kill-on-bad-exit=0"]
    if wait_s:
        # Once a task has ended, the others get distributed.timeout to end too, then srun kills them: a rank that
        # hangs (SIGSTOP, stuck I/O) would otherwise hold the allocation after its peers timed out and left.
        cmd.append(f"--wait={max(1, math.ceil(wait_s))}")
    if cpus:
        # srun no longer inherits the job's --cpus-per-task (Slurm >= 22.05): say it again for the step.
        cmd.append(f"--cpus-per-task={cpus}")
    cmd += [python, "-u", "-m", "fastclr.slurm", "exec", "--mode", mode, "--gpus-per-node", str(world.gpus_per_node),
            "--master-port", str(world.master_port), "--master-addr", world.master_addr, "--"]
    return cmd + trainer_args(recipe, overrides, script, task, source)


def node_address(node: str, runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> str:
    """Where ``node`` is reached: its name if it resolves (the usual cluster DNS), else Slurm's NodeAddr for it
    (``scontrol show node``), as on a cluster whose node names are Slurm's own (the local cluster: node1, node2)."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except OSError:
        pass
    try:
        out = runner(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SlurmError(f"node '{node}' does not resolve and `scontrol show node` failed: {e}") from None
    addr = re.search(r"\bNodeAddr=(\S+)", out.stdout or "")
    if out.returncode != 0 or not addr or addr.group(1) in ("(null)", ""):
        raise SlurmError(f"node '{node}' does not resolve, and `scontrol show node {node}` gives no NodeAddr "
                         f"({(out.stderr or out.stdout or '').strip()[:200]}); pass --master-addr")
    return addr.group(1)


def rank_env(world: SlurmWorld) -> dict[str, str]:
    """Variables one task of mode rank needs, mirroring what DeepSpeed's launch.py sets for its children."""
    if world.procid is None or world.localid is None:
        raise SlurmError("SLURM_PROCID and SLURM_LOCALID must be set in every task (mode rank runs under srun)")
    if world.ntasks is not None and world.ntasks != world.world_size:
        raise SlurmError(f"SLURM_NTASKS={world.ntasks} but {world.num_nodes} node(s) × {world.gpus_per_node} GPUs "
                         f"= {world.world_size} ranks; start the step with --ntasks-per-node={world.gpus_per_node}")
    if world.procid not in world.ranks_on(world.node_rank) or world.localid != world.procid % world.gpus_per_node:
        raise SlurmError(f"task SLURM_PROCID={world.procid} SLURM_LOCALID={world.localid} on node {world.node_rank} "
                         f"breaks the block layout (node {world.node_rank} holds ranks "
                         f"{world.ranks_on(world.node_rank).start}-{world.ranks_on(world.node_rank).stop - 1}); "
                         "start the step with --distribution=block")
    return {"RANK": str(world.procid), "LOCAL_RANK": str(world.localid), "WORLD_SIZE": str(world.world_size),
            "MASTER_ADDR": world.master_addr, "MASTER_PORT": str(world.master_port),
            "LOCAL_SIZE": str(world.gpus_per_node), "LOCAL_WORLD_SIZE": str(world.gpus_per_node),
            "CROSS_RANK": str(world.node_rank), "CROSS_SIZE": str(world.num_nodes)}


def deepspeed_command(world: SlurmWorld, hostfile: str, args: Sequence[str], python: str = sys.executable) -> list[str]:
    """DeepSpeed's launcher for this node: no ssh, this node's rank, the shared master, the hostfile's nodes."""
    return [python, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--no_ssh",
            f"--node_rank={world.node_rank}", f"--master_addr={world.master_addr}",
            f"--master_port={world.master_port}", f"--num_nodes={world.num_nodes}",
            f"--num_gpus={world.gpus_per_node}", *args]


def task_command(world: SlurmWorld, mode: str, args: Sequence[str], hostfile: str | None = None,
                 python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) that one srun task replaces itself with."""
    _check_mode(mode)
    env: dict[str, str] = {}
    cpus = world.cpus_per_rank(mode)
    # One BLAS/OpenMP thread per CPU Slurm gave the rank; unknown → 1, as torchrun does, rather than every core of
    # the node for each of G ranks.
    env["OMP_NUM_THREADS"] = str(cpus or 1)
    if mode == "rank":
        return [python, "-u", *args], {**env, **rank_env(world)}
    if hostfile is None:
        raise SlurmError("mode deepspeed needs the path of the hostfile written on this node")
    return deepspeed_command(world, hostfile, args, python), env


def requeue(env: Mapping[str, str] = os.environ,
            runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> bool:
    """Put this job back in the queue if it is still running (``scontrol requeue Incomplete $SLURM_JOB_ID``); True
    if Slurm accepted. Never raises.

    Requeueing a running job makes Slurm end it at once (SIGTERM to every step, SIGKILL after KillWait) before it
    goes back to pending, so call this from one rank only (rank 0), after the checkpoint is complete on every rank,
    right before exiting with :data:`PREEMPTED_EXIT_CODE`. The next start resumes from that checkpoint.
    """
    job = env.get("SLURM_JOB_ID")
    if not job:
        log.info("not requeueing: SLURM_JOB_ID is not set (not running under Slurm)")
        return False
    # Incomplete: only a job that is still running (the time-limit warning, a preemption notice). A job the user
    # cancelled is completing while its ranks checkpoint, and a plain requeue would bring it back (measured on Slurm
    # 22.05: scancel, then `scontrol requeue` from the exiting rank, and the job ran again).
    cmd = ["scontrol", "requeue", "Incomplete", job]
    try:
        result = runner(cmd, capture_output=True, text=True, timeout=60)
    except Exception as e:  # a missing scontrol or a hung controller must not stop the trainer from exiting
        log.warning("requeue of job %s failed: %s: %s", job, type(e).__name__, e)
        return False
    if result.returncode != 0:
        log.warning("requeue of job %s failed (scontrol exit %s): %s", job, result.returncode,
                    (result.stderr or result.stdout or "").strip())
        return False
    log.info("job %s requeued (unless it had stopped running: a cancelled job stays cancelled)", job)
    return True


# --------------------------------------------------------------------------------------------------------------- #
# Command line


def _fmt(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)


def describe(world: SlurmWorld, mode: str, cmd: Sequence[str], args: Sequence[str]) -> str:
    """The human-readable plan: world, hostfile, rank layout, master, and every command that will run."""
    lines = [f"fastclr.slurm: job {world.job_id} (restart {world.restart_count}), mode {mode}: "
             + ("one Slurm task per rank" if mode == "rank" else "one DeepSpeed launcher per node"),
             f"world: {world.num_nodes} node(s) x {world.gpus_per_node} GPU(s) = {world.world_size} rank(s)",
             f"master: {world.master_addr}:{world.master_port}",
             "hostfile:", *hostfile_text(world).splitlines(), "ranks:"]
    for i, host in enumerate(world.nodes):
        r = world.ranks_on(i)
        here = "   <- this node" if i == world.node_rank else ""
        lines.append(f"  node {i} {host}: ranks {r.start}-{r.stop - 1}{here}")
    lines += ["command:", _fmt(cmd)]
    if mode == "rank":
        lines.append("each task runs: RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID "
                     f"WORLD_SIZE={world.world_size} MASTER_ADDR={world.master_addr} "
                     f"MASTER_PORT={world.master_port} {_fmt([sys.executable, '-u', *args])}")
    else:
        for i, host in enumerate(world.nodes):
            lines.append(f"node {i} {host} runs: "
                         + _fmt(deepspeed_command(replace(world, node_rank=i), "<node-local hostfile>", args)))
    return "\n".join(lines)

