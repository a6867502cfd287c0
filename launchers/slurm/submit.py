"""Submit a fastclr stage to Slurm — pretraining, or linear / finetune / distill from a SOURCE — after checking its
config against the world it will run on; ``--after JOBID`` chains it after another job.

    python launchers/slurm/submit.py --recipe launchers/configs/imagenet_resnet50_bs4096.yaml \
        --nodes 8 --gpus-per-node 8 --time 24:00:00 [--partition P] [--account A] [--dry-run] \
        "data.path=/data/imagenet/train-{000000..001023}.tar" data.eval_path=/data/imagenet/val [key=value ...]
    python launchers/slurm/submit.py --recipe default --nodes 2 --gpus-per-node 1 --cpu --cpus-per-task 1 \
        --time 10:00                                 # CPU nodes (gloo), e.g. launchers/slurm/local_cluster.sh's
    python launchers/slurm/submit.py --task finetune --source runs/in1k/checkpoints --after 123 \
        --recipe finetune_imagenet_10pct --nodes 2 --gpus-per-node 8   # starts once job 123 has ended well

SimCLR v2 as three chained jobs: pretrain (job A), ``--task finetune --source <A's checkpoint.dir> --after A``
(job B), ``--task distill --source <B's output>/classifier.pt --after B``. A stage's SOURCE may not exist yet
when it is submitted after another job: its config is then checked when the job starts.

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
    p.add_argument("--task", choices=("pretrain", "linear", "finetune", "distill"), default="pretrain",
                   help="what the job runs (default: %(default)s)")
    p.add_argument("--source", default=None,
                   help="linear/finetune: the pretraining checkpoint (folder or checkpoint.dir); distill: the "
                        "teacher's classifier.pt")
    p.add_argument("--after", default=None, metavar="JOBID",
                   help="start only once job JOBID has completed successfully (sbatch --dependency=afterok:JOBID)")
    p.add_argument("--recipe", default=None,
                   help="YAML recipe, e.g. launchers/configs/imagenet_resnet50_bs4096.yaml (required for pretraining; "
                        "a stage's default is its source's own config)")
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
    if a.task == "pretrain" and not a.recipe:
        p.error("--recipe is required for pretraining")
    if a.task != "pretrain" and not a.source:
        p.error(f"--task {a.task} needs --source (the checkpoint or classifier.pt it starts from)")
    if a.after is not None and not a.after.isdigit():
        p.error(f"--after takes a job id (digits), got {a.after!r}")
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
    what = os.path.splitext(os.path.basename(recipe))[0] if recipe else "source-config"
    name = a.job_name or "fastclr-" + (what if a.task == "pretrain" else f"{a.task}-{what}")
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
    if a.after:
        cmd.append(f"--dependency=afterok:{a.after}")
    cmd += a.sbatch_arg
    job = ["--recipe", recipe] if recipe else []
    if a.task != "pretrain":
        job += ["--task", a.task, "--source", a.source]
    return cmd + [SBATCH_SCRIPT, *job, "--mode", a.mode, *plan, *a.overrides]


def check(a, world: int):
    """(recipe path or None, config, batch plan, batch section) of the job, checked as the ranks will check it; for a
    stage whose source is not there yet (chained with --after), the overrides only, on the default config."""
    from fastclr.config import load_config, recipe_path, validate_run
    from fastclr.slurm.__main__ import job_config

    recipe = os.path.abspath(recipe_path(a.recipe)) if a.recipe else None
    section = "train" if a.task == "pretrain" else a.task
    if a.task == "pretrain" or os.path.exists(a.source):
        cfg = job_config(a.task, a.source, recipe, a.overrides)[0]  # what the job's batch shell will check
    elif a.after:
        print(f"note: --source '{a.source}' does not exist yet (job {a.after} writes it); its config is checked "
              "when this job starts")
        cfg = load_config(recipe, a.overrides)
    else:
        raise FileNotFoundError(f"--source '{a.source}' does not exist (chain the job with --after JOBID if another "
                                "job writes it)")
    # The data may be mounted on the compute nodes only: missing paths are warned about below, not refused.
    plan = validate_run(cfg, world, cuda=None, local_files=False, section=section)  # the ranks check the device
    return recipe, cfg, plan, section


def main(argv=None) -> int:
    a = parse_args(argv)
    from fastclr.config import ConfigError, missing_paths
    from fastclr.optim import peak_lr

    world = a.nodes * a.gpus_per_node
    try:
        recipe, cfg, plan, section = check(a, world)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    lengths = cfg.optim if section == "train" else getattr(cfg, section)
    lr = peak_lr(lengths.base_lr, plan.global_batch, lengths.lr_scaling)
    rule = {"linear": f"{lengths.base_lr:g} x {plan.global_batch}/256",
            "sqrt": f"{lengths.base_lr:g} x sqrt({plan.global_batch})", "none": "base LR as is"}[lengths.lr_scaling]
    cpus = a.cpus_per_task or cfg.data.num_threads + 2
    log_dir = cfg.logging.dir if section == "train" else os.path.join(cfg.logging.dir, a.task)  # the stage's output
    log_dir = log_dir if os.path.isabs(log_dir) else os.path.join(ROOT, log_dir)
    unit = "CPU rank(s)" if a.cpu else "GPU(s)"
    print(f"task: {a.task}" + (f" from {a.source}" if a.source else "") + (f", after job {a.after}" if a.after else ""))
    print(f"world: {a.nodes} node(s) x {a.gpus_per_node} {unit} = {world} ranks, mode {a.mode}, {cpus} CPUs per rank")
    print(f"batch: global {plan.global_batch} = micro {plan.micro_batch} x accumulation {plan.accumulation} "
          f"x world {world}")
    print(f"peak LR: {lr:.4g} ({lengths.lr_scaling}: {rule}); set by the global batch, not by the node count")
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
