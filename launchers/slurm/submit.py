"""Submit fastclr pretraining to Slurm after checking the recipe against the world it will run on.

    python launchers/slurm/submit.py --recipe launchers/configs/imagenet_resnet50_bs4096.yaml \
        --nodes 8 --gpus-per-node 8 --time 24:00:00 [--partition P] [--account A] [--dry-run] [key=value ...]
    python launchers/slurm/submit.py --recipe default --nodes 2 --gpus-per-node 1 --cpu --cpus-per-task 1 \
        --time 10:00                                 # CPU nodes (gloo), e.g. launchers/slurm/local_cluster.sh's

Loads the recipe with the overrides, checks that the global batch divides into nodes × GPUs ranks (the same checks
the trainer runs before any compute), prints the batch arithmetic and the peak LR, and runs `sbatch
launchers/slurm/pretrain.sbatch` with options that override the script's #SBATCH defaults. --dry-run prints the
sbatch command instead of running it. Wiring only: the checks live in fastclr.config, the launch in fastclr.slurm.
"""
import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH_SCRIPT = os.path.join(ROOT, "launchers", "slurm", "pretrain.sbatch")
# The job imports fastclr from this checkout (the batch script puts it first on PYTHONPATH): check with the same code.
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    from fastclr.slurm import DEFAULT_MODE, MODES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. launchers/configs/imagenet_resnet50_bs4096.yaml")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= ranks) per node (default: %(default)s)")
    p.add_argument("--cpu", action="store_true",
                   help="CPU nodes (gloo): ask Slurm for no GPUs; --gpus-per-node then counts the ranks per node")
    p.add_argument("--time", default="24:00:00",
                   help="wall-clock limit per start, Slurm syntax (default: %(default)s); the job checkpoints about "
                        "5 minutes before it and requeues itself")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--job-name", default=None, help="default: fastclr-<recipe name>")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per rank (default: the recipe's data.num_threads + 2: pipeline workers, the training "
                        "loop, and one spare)")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help="rank: one Slurm task per GPU (default); deepspeed: DeepSpeed's launcher on each node")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                   help="extra sbatch option, repeatable (e.g. --sbatch-arg=--exclusive --sbatch-arg=--mem=0)")
    p.add_argument("--dry-run", action="store_true", help="check and print the sbatch command; submit nothing")
    p.add_argument("overrides", nargs="*", help="section.field=value, applied after the recipe")
    a = p.parse_intermixed_args(argv)
    for name in ("nodes", "gpus_per_node"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.cpus_per_task is not None and a.cpus_per_task < 1:
        p.error(f"--cpus-per-task must be >= 1, got {a.cpus_per_task}")
    return a


def sbatch_command(a, recipe: str, cpus_per_rank: int, log_dir: str) -> list[str]:
    """Options for the mode's task layout (G tasks per node, or 1 task holding the node's CPUs), then the script and
    the arguments it hands to `python -m fastclr.slurm plan`."""
    per_node, cpus = (a.gpus_per_node, cpus_per_rank) if a.mode == "rank" else (1, cpus_per_rank * a.gpus_per_node)
    name = a.job_name or "fastclr-" + os.path.splitext(os.path.basename(recipe))[0]
    # A CPU partition has no GPU gres to give (sbatch refuses the batch script's default --gpus-per-node=8 there;
    # 0 is accepted): the ranks per node then travel as the batch script's own --gpus-per-node, which
    # `python -m fastclr.slurm plan` reads instead of SLURM_GPUS_*.
    gpus = [f"--gpus-per-node={0 if a.cpu else a.gpus_per_node}"]
    plan = ["--gpus-per-node", str(a.gpus_per_node)] if a.cpu else []
    cmd = ["sbatch", f"--job-name={name}", f"--nodes={a.nodes}", f"--ntasks-per-node={per_node}",
           *gpus, f"--cpus-per-task={cpus}", f"--time={a.time}",
           f"--output={os.path.join(log_dir, 'slurm-%j.out')}", f"--chdir={ROOT}",
           f"--export=ALL,FASTCLR_ROOT={ROOT}"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k in ("partition", "account", "qos") if (v := getattr(a, k))]
    cmd += a.sbatch_arg
    return cmd + [SBATCH_SCRIPT, "--recipe", recipe, "--mode", a.mode, *plan, *a.overrides]


def main(argv=None) -> int:
    a = parse_args(argv)
    from fastclr.config import ConfigError, load_config, missing_paths, recipe_path, validate_run
    from fastclr.optim import peak_lr

    world = a.nodes * a.gpus_per_node
    try:
        recipe = os.path.abspath(recipe_path(a.recipe))
        cfg = load_config(recipe, a.overrides)
        # The data may be mounted on the compute nodes only: missing paths are warned about below, not refused.
        plan = validate_run(cfg, world, cuda=None, local_files=False)  # the ranks check the device
    except ConfigError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    lr = peak_lr(cfg.optim.base_lr, plan.global_batch, cfg.optim.lr_scaling)
    rule = {"linear": f"{cfg.optim.base_lr:g} x {plan.global_batch}/256",
            "sqrt": f"{cfg.optim.base_lr:g} x sqrt({plan.global_batch})", "none": "base LR as is"}[cfg.optim.lr_scaling]
    cpus = a.cpus_per_task or cfg.data.num_threads + 2
    log_dir = cfg.logging.dir if os.path.isabs(cfg.logging.dir) else os.path.join(ROOT, cfg.logging.dir)
    unit = "CPU rank(s)" if a.cpu else "GPU(s)"
    print(f"world: {a.nodes} node(s) x {a.gpus_per_node} {unit} = {world} ranks, mode {a.mode}, {cpus} CPUs per rank")
    print(f"batch: global {plan.global_batch} = micro {plan.micro_batch} x accumulation {plan.accumulation} "
          f"x world {world}")
    print(f"peak LR: {lr:.4g} ({cfg.optim.lr_scaling}: {rule}); set by the global batch, not by the node count")
    for field, path in missing_paths(cfg):
        print(f"warning: {field} '{path}' is not visible here; it must exist on the compute nodes")
    cmd = sbatch_command(a, recipe, cpus, log_dir)
    print("sbatch command:\n" + shlex.join(cmd), flush=True)
    if a.dry_run:
        print("dry run: nothing submitted")
        return 0
    os.makedirs(log_dir, exist_ok=True)  # Slurm does not create the --output folder; a missing one loses the log
    try:
        result = subprocess.run(cmd, cwd=ROOT)
    except FileNotFoundError:
        print("submit.py: error: sbatch not found on PATH; run this on a Slurm login node", file=sys.stderr)
        return 2
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
