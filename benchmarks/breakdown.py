"""Where a step's time goes, from the trainer's own timers: data wait, forward, loss, backward, gradient all-reduce
(``comm``), optimizer. Runs the real entry point with 2 ranks through the DeepSpeed launcher (gloo on CPU, NCCL on
GPUs) and ``logging.timers=true``, then reads the per-phase milliseconds the trainer logged.

    PYTHONPATH=. python -m benchmarks.breakdown [--quick] [--ranks 2] [-- extra recipe overrides]

The timers synchronize the device at each phase boundary on CUDA, so the phases add up to the step; that costs a
little throughput, which is why they are off by default in training. Cross-replica negatives (the embedding
all-gather) are inside ``loss`` and global-BN statistics inside ``forward``/``backward``; with timers on and ≥ 2
ranks the trainer puts a barrier before the last backward, in both runs, so ``wait`` is time spent waiting for the
slowest rank and ``comm`` the time from the end of backward to averaged gradients: the whole all-reduce after
backward, what backward did not hide with overlap.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from .common import RESULTS, ROOT, Recorder

from fastclr.timers import PhaseTimer
from fastclr.runtime import free_port

PHASES = PhaseTimer.PHASES
SCRIPT = os.path.join(ROOT, "launchers", "pretrain.py")


def settings(quick: bool, smoke: bool) -> dict:
    """The recipe (the embedded default) and how long to run it."""
    if smoke:
        return dict(overrides=["model.width_mult=0.125", "train.global_batch_size=64"], steps=6, log_every=2)
    if quick:
        return dict(overrides=[], steps=15, log_every=5)
    return dict(overrides=[], steps=40, log_every=5)


def launch(ranks: int, overrides: list[str], run_dir: str, timeout: int = 900) -> subprocess.CompletedProcess:
    deepspeed = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), SCRIPT, *overrides,
            f"logging.dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", "logging.timers=true",
            "logging.tensorboard=false", "eval.probe_epochs=0", "eval.baseline=false", "eval.max_eval_images=512"]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run(rec: Recorder, *, quick: bool = False, smoke: bool = False, ranks: int = 2,
        extra: list[str] | None = None) -> dict:
    """Two runs side by side: the gradient all-reduce after backward (the reference breakdown; 'comm' is the whole
    all-reduce) and overlapped with backward (fastclr's default; 'comm' is what backward did not hide). Records one
    row per phase of each (ms per step, median over the logged intervals after the first); returns the reference's
    {'phases': {phase: ms}, 'step_ms', 'overrides', 'ranks', 'cfg'} with the overlapped run's phases under
    'overlap_phases'."""
    import torch

    if torch.cuda.is_available():
        ranks = min(ranks, torch.cuda.device_count())  # one rank per GPU; a 1-GPU machine has no comm phase
    s = settings(quick, smoke)
    overrides = [*s["overrides"], f"train.stop_at_step={s['steps']}", f"train.log_every={s['log_every']}",
                 "train.epochs=100", *(extra or [])]
    reference = _one(rec, ranks, overrides + ["distributed.overlap_comm=false"], f"breakdown {ranks} ranks")
    overlapped = _one(rec, ranks, overrides + ["distributed.overlap_comm=true"], f"breakdown {ranks} ranks overlapped")
    return {**reference, "overlap_phases": overlapped["phases"]}


def _one(rec: Recorder, ranks: int, overrides: list[str], group: str) -> dict:
    run_dir = tempfile.mkdtemp(prefix="fastclr-breakdown-")
    proc = launch(ranks, overrides, run_dir)
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks}-rank run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = [r for r in rows if r["kind"] == "train" and "t_forward_ms" in r][1:]  # first interval: warm-up
    if not train:
        raise RuntimeError(f"no timed intervals in {run_dir}/metrics.jsonl")
    from fastclr.config import load_config
    from fastclr.config.run import precision_name

    cfg = load_config(os.path.join(ROOT, "launchers", "configs", "default.yaml"), overrides)
    shape = (f"{cfg.model.arch} width {cfg.model.width_mult:g}, {cfg.data.image_size}px, global batch "
             f"{cfg.train.global_batch_size} on {ranks} ranks, {cfg.data.dataset}")
    phases = {}
    for phase in PHASES:
        values = [r[f"t_{phase}_ms"] for r in train]
        phases[phase] = rec.add(benchmark="breakdown", group=group, variant=phase, role="measure", shape=shape,
                                dtype=precision_name(cfg), unit="ms/step", values=values)["median"]
    ips = [r["images_per_s"] for r in train]
    rec.add(benchmark="breakdown", group=f"{group} throughput", variant="images/s", role="measure", shape=shape,
            dtype=precision_name(cfg), unit="images/s", values=ips)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"phases": phases, "step_ms": sum(phases.values()), "overrides": overrides, "ranks": ranks, "cfg": cfg}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 2.3))
    bars = [("after backward", result["phases"])] + (
        [("overlapped", result["overlap_phases"])] if result.get("overlap_phases") else [])
    colors = dict(zip(PHASES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for y, (_, phases) in enumerate(bars):
        left = 0.0
        for phase in PHASES:
            ms = phases[phase]
            ax.barh([y], [ms], left=left, color=colors[phase], label=f"{phase} {ms:.0f}" if y == 0 else None)
            left += ms
    ax.set_yticks(range(len(bars)), [name for name, _ in bars], fontsize=8)
    ax.set_xlabel("ms per step")
    ax.set_title(f"step breakdown, {result['ranks']} ranks (trainer timers)", fontsize=9)
    ax.legend(ncol=3, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", default=os.path.join(RESULTS, "breakdown.jsonl"))
    p.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    args = p.parse_args(argv)
    result = run(Recorder(args.out), quick=args.quick, ranks=args.ranks, extra=args.overrides)
    plot(result, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
