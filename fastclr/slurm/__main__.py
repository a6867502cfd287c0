"""``python -m fastclr.slurm plan|exec|progress``: the two steps of a Slurm launch (see the package docstring), and
the batch script's question after a failed start: was a checkpoint completed since it began?"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from dataclasses import replace
from typing import Sequence

from .interfaces import gloo_env
from .launch import (DEFAULT_MODE, DEFAULT_RECIPE, MODES, PRETRAIN_SCRIPT, TASKS, describe, launch_command,
                     node_address, task_command, trainer_args)
from .world import SlurmError, SlurmWorld, hostfile_text


def job_config(task: str, source: str | None, recipe: str | None, overrides: Sequence[str]):
    """(config, batch section) of what a job runs: pretraining's recipe ← overrides, or a stage's config from its
    source (``fastclr.tasks.common.task_config``). Here, in
    the entry point, not in :mod:`.launch`: the stage commands import that module (for the requeue call)."""
    from ..config import load_config

    if task == "pretrain":
        return load_config(recipe or DEFAULT_RECIPE, overrides), "train"
    from ..tasks.common import task_config
    from ..weights import load_weights

    return task_config(load_weights(source), recipe, list(overrides), task), task


def _check_recipe(recipe: str | None, overrides: Sequence[str], world: SlurmWorld, task: str = "pretrain",
                  source: str | None = None):
    """Fail in the batch shell, naming the field, rather than in every rank after the allocation started; (the
    batch arithmetic as text, the config)."""
    from ..config import missing_paths, validate_run

    cfg, section = job_config(task, source, recipe, overrides)
    # cuda=None: the ranks' device is not known in this shell (a CPU batch node may drive GPU ranks, or gloo
    # ranks); the device checks are the ranks' own, before any compute. Likewise data mounted on the compute nodes
    # only: a warning here, the ranks' own check fails before any compute if a path is really missing.
    plan = validate_run(cfg, world.world_size, cuda=None, local_files=False, section=section)
    warnings = "".join(f"warning: {name} '{path}' is not visible on this node\n" for name, path in missing_paths(cfg))
    return (f"{warnings}batch: global {plan.global_batch} = micro {plan.micro_batch} x accumulation "
            f"{plan.accumulation} x world {plan.world_size}"), cfg


def _job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None,
                   help=f"recipe name or YAML file (pretraining's default: {DEFAULT_RECIPE}; a stage's: its source's "
                        "own config)")
    p.add_argument("--task", choices=TASKS, default="pretrain", help="what the job runs (default: %(default)s)")
    p.add_argument("--source", default=None, help="a stage's source: the checkpoint or classifier.pt it starts from")


def _plan_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclr.slurm plan",
                                description="Resolve the Slurm world, print it, and start the ranks with srun.")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the command, start nothing")
    _job_arguments(p)
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE, help="launch mode (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="override the GPUs per node read from SLURM_GPUS_* (on CPU nodes: ranks per node)")
    p.add_argument("--master-port", type=int, default=None, help="override the port derived from SLURM_JOB_ID")
    p.add_argument("--master-addr", default=None,
                   help="override where rank 0 listens (default: the first node's name, or its NodeAddr when the "
                        "name does not resolve)")
    p.add_argument("--script", default=PRETRAIN_SCRIPT, help="training entry point (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="section.field=value, passed to the trainer")
    a = p.parse_intermixed_args(argv)
    world = SlurmWorld.from_env(gpus_per_node=a.gpus_per_node, master_port=a.master_port)
    if a.task == "pretrain" and a.recipe is None:
        a.recipe = DEFAULT_RECIPE
    batch, cfg = _check_recipe(a.recipe, a.overrides, world, a.task, a.source)
    world = replace(world, master_host=a.master_addr or node_address(world.nodes[0]))
    cmd = launch_command(world, a.recipe, a.overrides, a.mode, a.script, wait_s=cfg.distributed.timeout,
                         task=a.task, source=a.source)
    print(describe(world, a.mode, cmd, trainer_args(a.recipe, a.overrides, a.script, a.task, a.source)))
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
    p.add_argument("--master-addr", default=None)
    a = p.parse_args(own)
    if not command:
        raise SlurmError("exec: no training command after '--'")
    world = SlurmWorld.from_env(gpus_per_node=a.gpus_per_node, master_port=a.master_port, master_addr=a.master_addr)
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
    gloo, note = gloo_env(os.environ)  # on the node itself: interface names differ between nodes
    extra.update(gloo)
    if note and world.localid in (None, 0):
        print(f"fastclr: node {world.node}: {note}", file=sys.stderr)
    env = dict(os.environ)
    for key, value in extra.items():
        if key == "OMP_NUM_THREADS" and key in env:
            continue  # the user's explicit setting wins
        env[key] = value
    # Until the trainer installs its SIGUSR1 handler (imports, model build, resume) an early signal must neither
    # kill the rank nor be lost: Slurm sends its time-limit warning once. A blocked signal stays pending through fork
    # and exec; the trainer unblocks it with its handler in place (fastclr.preemption.StopSignals). In mode deepspeed
    # both DeepSpeed launchers keep it blocked, so the signal that asks for a checkpoint cannot kill them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    sys.stdout.flush()
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        raise SlurmError(f"cannot start '{cmd[0]}': {e}") from None


def _progress_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclr.slurm progress",
                                description="Exit 0 printing its tag if a checkpoint of the recipe was completed after "
                                            "--since (Unix time), else 1: did a failed start make progress?")
    p.add_argument("--since", type=float, required=True)
    _job_arguments(p)
    for hidden in ("--mode", "--gpus-per-node", "--master-port", "--master-addr", "--script"):  # plan's, passed along
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    from ..checkpoint import COMPLETE, complete_tags

    ckpt_dir = job_config(a.task, a.source, a.recipe, a.overrides)[0].checkpoint.dir
    tags = complete_tags(ckpt_dir)
    if tags and os.path.getmtime(os.path.join(ckpt_dir, tags[-1][1], COMPLETE)) > a.since:
        print(tags[-1][1])
        return 0
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"plan": _plan_main, "exec": _exec_main, "progress": _progress_main}
    if not argv or argv[0] not in commands:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        print(f"fastclr.slurm: error: choose a command: {', '.join(commands)}", file=sys.stderr)
        return 2
    from ..config import ConfigError

    try:
        return commands[argv[0]](argv[1:])
    except (SlurmError, ConfigError) as e:
        print(f"fastclr.slurm: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(main())
