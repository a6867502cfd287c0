"""Slurm: from the SLURM_* environment to a DeepSpeed world, the launch command, and the requeue call.

    python -m fastclr.slurm plan [--dry-run] [--recipe R] [--mode rank|deepspeed] [key=value ...]   # batch shell
    python -m fastclr.slurm exec --mode M --gpus-per-node G --master-port P -- SCRIPT [ARGS ...]      # every task

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
every node. To make it preemption-safe, ``exec`` sets SIGUSR1 to "ignore" before starting the launcher: an ignored
disposition survives ``exec`` and ``fork``, so the launchers ignore the signal while the trainer, which installs its
own handler, still receives it. SIGTERM still goes through ``launch.py``'s handler (see above).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

log = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_SCRIPT = os.path.join(ROOT, "launchers", "pretrain.py")
DEFAULT_RECIPE = os.path.join(ROOT, "launchers", "configs", "default.yaml")
MODES = ("rank", "deepspeed")
DEFAULT_MODE = "rank"
PREEMPTED_EXIT_CODE = 3
"""The trainer's exit status after a signal made it stop with a checkpoint written (the batch script maps it to 0)."""
# Master ports come from [20000, 32000): below Linux's default ephemeral range (32768–60999), where the kernel may
# already have handed the port to some outgoing connection on the first node.
MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 12000


class SlurmError(ValueError):
    """The Slurm environment (or a request about it) is unusable; the message names the variable or argument."""


# --------------------------------------------------------------------------------------------------------------- #
# Node lists


def _split_outside_brackets(text: str, whole: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise SlurmError(f"node list '{whole}': nested '[' at position {i}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise SlurmError(f"node list '{whole}': ']' at position {i} without a matching '['")
            depth = 0
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SlurmError(f"node list '{whole}': '[' is never closed")
    parts.append(text[start:])
    return parts


def _range_values(body: str, whole: str) -> list[str]:
    """'01-03,07' → ['01', '02', '03', '07']; a range is zero-padded to the width of its lower bound, as Slurm does."""
    values = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise SlurmError(f"node list '{whole}': '[{body}]' holds '{part}'; expected N or N-M with digits")
        if not sep:
            values.append(lo)
            continue
        a, b = int(lo), int(hi)
        if a > b:
            raise SlurmError(f"node list '{whole}': range '{part}' runs backwards")
        values.extend(str(n).zfill(len(lo)) for n in range(a, b + 1))
    return values


def _expand_name(name: str, whole: str) -> list[str]:
    """Cartesian product of the bracket groups of one name: 'r[1-2]-n[1-2]' → r1-n1, r1-n2, r2-n1, r2-n2."""
    i = name.find("[")
    if i < 0:
        return [name]
    j = name.index("]", i)  # balanced: checked by _split_outside_brackets
    rest = _expand_name(name[j + 1:], whole)
    return [name[:i] + v + tail for v in _range_values(name[i + 1:j], whole) for tail in rest]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list ('node[01-03,07],gpu-a[1-2]') in Slurm's order.

    Pure Python on purpose: every node must derive the same list without running anything, and the tests need no
    Slurm. Covers what Slurm writes into SLURM_JOB_NODELIST: prefixes and suffixes, several bracket groups per name,
    comma lists and zero-padded ranges inside brackets, several names separated by commas outside brackets.
    """
    text = nodelist.strip()
    if not text:
        raise SlurmError("node list is empty")
    hosts = []
    for name in _split_outside_brackets(text, text):
        name = name.strip()
        if not name or name.startswith("["):
            raise SlurmError(f"node list '{text}': empty host name around '{name}'")
        hosts.extend(_expand_name(name, text))
    return hosts


# --------------------------------------------------------------------------------------------------------------- #
# The world as Slurm describes it


def default_master_port(job_id: int) -> int:
    """A port every node derives from the job id alone; a requeued job keeps its id and so its port."""
    return MASTER_PORT_BASE + job_id % MASTER_PORT_SPAN


def parse_gpu_count(value: str, name: str) -> int:
    """'4', 'gpu:4', 'a100:4', 'a100:2,v100:2' (Slurm's [type:]count, comma-separated per type) → GPUs per node."""
    total = 0
    for item in value.split(","):
        count = item.strip().rsplit(":", 1)[-1]
        if not count.isdigit():
            raise SlurmError(f"{name}={value!r}: expected [type:]count such as 4 or a100:4")
        total += int(count)
    return total


def _int_env(env: Mapping[str, str], name: str, required: bool, why: str = "") -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        if required:
            raise SlurmError(f"{name} is not set{why}; run this inside a Slurm allocation (sbatch/salloc/srun)")
        return None
    try:
        return int(raw)
    except ValueError:
        raise SlurmError(f"{name}={raw!r} is not an integer") from None


def _gpus_from_env(env: Mapping[str, str]) -> int:
    if env.get("SLURM_GPUS_ON_NODE"):
        return _int_env(env, "SLURM_GPUS_ON_NODE", True)
    if env.get("SLURM_GPUS_PER_NODE"):
        return parse_gpu_count(env["SLURM_GPUS_PER_NODE"], "SLURM_GPUS_PER_NODE")
    if env.get("SLURM_JOB_GPUS"):  # device indices, e.g. '0,1,2,3' (jobs that asked with --gres=gpu:N)
        return len([g for g in env["SLURM_JOB_GPUS"].split(",") if g.strip()])
    raise SlurmError("GPUs per node unknown: none of SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS is set; "
                     "submit with --gpus-per-node=G or pass --gpus-per-node G (on CPU nodes: ranks per node)")


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
    """Tasks the job has on each node: SLURM_NTASKS_PER_NODE when it asked for it, else the first count of
    SLURM_TASKS_PER_NODE ('8(x2)' = 8 tasks on each of 2 nodes)."""
    n = _int_env(env, "SLURM_NTASKS_PER_NODE", False)
    if n is not None:
        return n
    m = re.match(r"\s*(\d+)", env.get("SLURM_TASKS_PER_NODE", ""))
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class SlurmWorld:
    """Nodes × GPUs of one job; global ranks are laid out node by node (node i holds ranks i·G … i·G+G−1)."""

    job_id: int
    nodes: tuple[str, ...]
    gpus_per_node: int
    node_rank: int
    """This process's node (SLURM_NODEID): an index into ``nodes``."""
    master_port: int
    procid: int | None = None
    """SLURM_PROCID: the task's index in the step (the global rank in mode ``rank``)."""
    localid: int | None = None
    """SLURM_LOCALID: the task's index on its node."""
    ntasks: int | None = None
    """SLURM_NTASKS of the step (or job)."""
    cpus_per_task: int | None = None
    tasks_per_node: int | None = None
    """Tasks per node of the job: how many tasks its ``--cpus-per-task`` is counted for."""
    restart_count: int = 0

    def __post_init__(self):
        if not self.nodes:
            raise SlurmError("the job has no nodes")
        if self.gpus_per_node < 1:
            raise SlurmError(f"GPUs per node is {self.gpus_per_node}; need >= 1 (on CPU nodes pass --gpus-per-node N "
                             "for N ranks per node)")
        if not 0 <= self.node_rank < len(self.nodes):
            raise SlurmError(f"SLURM_NODEID={self.node_rank} is outside the job's {len(self.nodes)} node(s)")
        if not 1 <= self.master_port <= 65535:
            raise SlurmError(f"master port {self.master_port} is not a TCP port")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, gpus_per_node: int | None = None,
                 master_port: int | None = None) -> "SlurmWorld":
        """Read the job from SLURM_* variables; ``gpus_per_node``/``master_port`` override what they imply."""
        env = os.environ if env is None else env
        job_id = _int_env(env, "SLURM_JOB_ID", True)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise SlurmError("SLURM_JOB_NODELIST (or SLURM_NODELIST) is not set; run this inside a Slurm allocation")
        nodes = tuple(expand_nodelist(nodelist))
        for name in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
            n = _int_env(env, name, False)
            if n is not None and n != len(nodes):
                raise SlurmError(f"{name}={n} but the node list '{nodelist}' names {len(nodes)} node(s)")
        if gpus_per_node is None:
            gpus_per_node = _gpus_from_env(env)
        return cls(job_id=job_id, nodes=nodes, gpus_per_node=gpus_per_node,
                   node_rank=_int_env(env, "SLURM_NODEID", True, " (the node's index in the job)"),
                   master_port=default_master_port(job_id) if master_port is None else master_port,
                   procid=_int_env(env, "SLURM_PROCID", False), localid=_int_env(env, "SLURM_LOCALID", False),
                   ntasks=_int_env(env, "SLURM_NTASKS", False),
                   cpus_per_task=_int_env(env, "SLURM_CPUS_PER_TASK", False),
                   tasks_per_node=_tasks_per_node(env),
                   restart_count=_int_env(env, "SLURM_RESTART_COUNT", False) or 0)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def master_addr(self) -> str:
        """The first node: it hosts global rank 0, whose TCP store every rank dials."""
        return self.nodes[0]

    @property
    def node(self) -> str:
        return self.nodes[self.node_rank]

    def ranks_on(self, node_rank: int) -> range:
        return range(node_rank * self.gpus_per_node, (node_rank + 1) * self.gpus_per_node)

    def cpus_per_rank(self, mode: str) -> int | None:
        """CPUs Slurm gave one rank: --cpus-per-task in mode rank; the node task's share in mode deepspeed."""
        if self.cpus_per_task is None:
            return None
        if mode == "rank":
            return self.cpus_per_task
        return max(1, self.cpus_per_task * (self.tasks_per_node or 1) // self.gpus_per_node)


def hostfile_text(world: SlurmWorld) -> str:
    """DeepSpeed hostfile (MPI style): one 'host slots=G' line per node, in node-rank order."""
    return "".join(f"{host} slots={world.gpus_per_node}\n" for host in world.nodes)


# --------------------------------------------------------------------------------------------------------------- #
# Commands


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise SlurmError(f"mode '{mode}' is unknown; choose one of {MODES}")


def trainer_args(recipe: str | None = None, overrides: Sequence[str] = (), script: str = PRETRAIN_SCRIPT) -> list[str]:
    """What follows ``python`` (or DeepSpeed's launcher) on every rank."""
    return [script] + (["--config", recipe] if recipe else []) + list(overrides)


def launch_command(world: SlurmWorld, recipe: str | None = None, overrides: Sequence[str] = (),
                   mode: str = DEFAULT_MODE, script: str = PRETRAIN_SCRIPT, python: str = sys.executable) -> list[str]:
    """The ``srun`` command the batch script runs: one task per rank (mode rank) or per node (mode deepspeed)."""
    _check_mode(mode)
    per_node = world.gpus_per_node if mode == "rank" else 1
    cpus = world.cpus_per_task if mode == "rank" else (
        world.cpus_per_task * (world.tasks_per_node or 1) if world.cpus_per_task else None)
    cmd = ["srun", f"--nodes={world.num_nodes}", f"--ntasks={world.num_nodes * per_node}",
           f"--ntasks-per-node={per_node}",
           # block: task i·G+j on node i, the layout `plan` prints and `exec` checks.
           "--distribution=block",
           # A rank exits 3 after its checkpoint; killing its peers then could cut their part of the write short,
           # and srun would report the kill instead of the 3. A crashed rank still ends the step: its peers fail
           # their next collective.
           "--kill-on-bad-exit=0"]
    if cpus:
        # srun no longer inherits the job's --cpus-per-task (Slurm >= 22.05): say it again for the step.
        cmd.append(f"--cpus-per-task={cpus}")
    cmd += [python, "-u", "-m", "fastclr.slurm", "exec", "--mode", mode, "--gpus-per-node", str(world.gpus_per_node),
            "--master-port", str(world.master_port), "--"]
    return cmd + trainer_args(recipe, overrides, script)


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
    """Put this job back in the queue (``scontrol requeue $SLURM_JOB_ID``); True if Slurm accepted. Never raises.

    Requeueing a running job makes Slurm end it at once (SIGTERM to every step, SIGKILL after KillWait) before it
    goes back to pending, so call this from one rank only (rank 0), after the checkpoint is complete on every rank,
    right before exiting with :data:`PREEMPTED_EXIT_CODE`. The next start resumes from that checkpoint.
    """
    job = env.get("SLURM_JOB_ID")
    if not job:
        log.info("not requeueing: SLURM_JOB_ID is not set (not running under Slurm)")
        return False
    cmd = ["scontrol", "requeue", job]
    try:
        result = runner(cmd, capture_output=True, text=True, timeout=60)
    except Exception as e:  # a missing scontrol or a hung controller must not stop the trainer from exiting
        log.warning("requeue of job %s failed: %s: %s", job, type(e).__name__, e)
        return False
    if result.returncode != 0:
        log.warning("requeue of job %s failed (scontrol exit %s): %s", job, result.returncode,
                    (result.stderr or result.stdout or "").strip())
        return False
    log.info("job %s requeued", job)
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


def _check_recipe(recipe: str, overrides: Sequence[str], world: SlurmWorld) -> str:
    """Fail in the batch shell, naming the field, rather than in every rank after the allocation started."""
    from .config import load_config, validate_run

    cfg = load_config(recipe, overrides)
    # cuda=True: the compute nodes have GPUs even when this shell cannot see them; the GPU-only checks then pass and
    # the trainer repeats them with the real device.
    plan = validate_run(cfg, world.world_size, cuda=True)
    return (f"batch: global {plan.global_batch} = micro {plan.micro_batch} x accumulation {plan.accumulation} "
            f"x world {plan.world_size}")


def _plan_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclr.slurm plan",
                                description="Resolve the Slurm world, print it, and start the ranks with srun.")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the command, start nothing")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="YAML recipe (default: %(default)s)")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE, help="launch mode (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="override the GPUs per node read from SLURM_GPUS_* (on CPU nodes: ranks per node)")
    p.add_argument("--master-port", type=int, default=None, help="override the port derived from SLURM_JOB_ID")
    p.add_argument("--script", default=PRETRAIN_SCRIPT, help="training entry point (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="section.field=value, passed to the trainer")
    a = p.parse_intermixed_args(argv)
    world = SlurmWorld.from_env(gpus_per_node=a.gpus_per_node, master_port=a.master_port)
    batch = _check_recipe(a.recipe, a.overrides, world)
    cmd = launch_command(world, a.recipe, a.overrides, a.mode, a.script)
    print(describe(world, a.mode, cmd, trainer_args(a.recipe, a.overrides, a.script)))
    print(batch, flush=True)
    if a.dry_run:
        print("dry run: nothing started", flush=True)
        return 0
    try:
        os.execvp(cmd[0], cmd)  # srun becomes the batch shell's child: signals and exit status pass straight through
    except OSError as e:
        raise SlurmError(f"cannot start '{cmd[0]}': {e}; is Slurm's srun on PATH?") from None


def _exec_main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if "--" not in argv:
        raise SlurmError("exec needs '--' before the training command")
    cut = argv.index("--")
    own, command = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m fastclr.slurm exec",
                                description="Inside one srun task: set the rank environment and exec the trainer.")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--master-port", type=int, default=None)
    a = p.parse_args(own)
    if not command:
        raise SlurmError("exec: no training command after '--'")
    world = SlurmWorld.from_env(gpus_per_node=a.gpus_per_node, master_port=a.master_port)
    slurmd_node = os.environ.get("SLURMD_NODENAME")
    if slurmd_node and slurmd_node != world.node:
        # MASTER_ADDR and the hostfile assume SLURM_NODEID indexes the expanded node list; if it does not, rank 0
        # would not be where the others look for it and the rendezvous would hang instead of failing.
        raise SlurmError(f"this task runs on {slurmd_node} (SLURMD_NODENAME) but SLURM_NODEID={world.node_rank} "
                         f"is {world.node} in the node list")
    hostfile = None
    if a.mode == "deepspeed":
        # One launcher task per node, and a name fixed by the job id: a requeued start overwrites, never piles up.
        hostfile = os.path.join(tempfile.gettempdir(), f"fastclr-{world.job_id}.hostfile")
        with open(hostfile + ".part", "w") as f:
            f.write(hostfile_text(world))
        os.replace(hostfile + ".part", hostfile)
    cmd, extra = task_command(world, a.mode, command, hostfile)
    env = dict(os.environ)
    for key, value in extra.items():
        if key == "OMP_NUM_THREADS" and key in env:
            continue  # the user's explicit setting wins
        env[key] = value
    # Until the trainer installs its SIGUSR1 handler (imports, model build) an early signal is dropped instead of
    # killing the rank; in mode deepspeed the ignored disposition also keeps both DeepSpeed launchers alive. A
    # disposition of "ignore" is inherited through fork and exec; an installed handler replaces it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.stdout.flush()
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        raise SlurmError(f"cannot start '{cmd[0]}': {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"plan": _plan_main, "exec": _exec_main}
    if not argv or argv[0] not in commands:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        print(f"fastclr.slurm: error: choose a command: {', '.join(commands)}", file=sys.stderr)
        return 2
    from .config import ConfigError

    try:
        return commands[argv[0]](argv[1:])
    except (SlurmError, ConfigError) as e:
        print(f"fastclr.slurm: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(main())
