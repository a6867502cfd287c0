"""Time to accuracy on real images, in two forms.

``--recipe cifar10_quick_cpu`` (default): fastclr with the CIFAR quick recipe against a plain PyTorch SimCLR, the
same wall time each, the same network, the same data, scored by the same kNN.

    PYTHONPATH=. python -m benchmarks --only tta [--quick]       # 10 minutes each (--quick: 2)
    PYTHONPATH=. python -m benchmarks.tta --minutes 10

``--recipe cifar10_resnet18_gpu``: fastclr's full-width ResNet-18 on all 50,000 CIFAR-10 training images against a
published mark — lightly's ResNet-18 SimCLR benchmark, kNN (k = 200) 84.7% after 200 epochs at batch 128, which took
97.7 minutes on one A6000 — on one GPU in a 10-minute budget (the recipe's comments give the arithmetic). Rows: the
kNN curve against training time, the final kNN beside 84.7%, and the seconds to reach 84.7% beside 97.7 minutes
(none if not reached). Without a GPU the same command runs a 1-minute smoke of the same path (a narrow network,
small batch, a capped evaluation: ``CPU_SMOKE``), which the test suite runs.

    PYTHONPATH=. python -m benchmarks --only tta --recipe cifar10_resnet18_gpu

* ``fastclr``: ``fastclr pretrain --config cifar10_quick_cpu`` (its DALI loader, bf16 autocast where the CPU has bf16
  units, channels_last, the tiled loss, multi-tensor LARS, its time budget sizing the cosine) in a fresh process;
  its kNN monitor gives the curve, each point at the training seconds before it (evaluations excluded).
* ``plain-pytorch`` (baseline): :mod:`benchmarks.plain_simclr` — PIL DataLoader with the paper's augmentations, fp32,
  NCHW, the masked (2N × 2N) cross-entropy, per-parameter LARS — on the recipe's network, batch, temperature, LR
  rule, warm-up and weight decay; its length is chosen from its own measured speed for the same budget (the same
  rule, fastclr.budget: decided after the warm-up's first steps, re-planned at each epoch boundary), and it is
  evaluated at the same epochs by fastclr's evaluation (features of the held-out
  tar through the same loader, the same kNN).

Rows: kNN top-1 at equal wall time (both runs' final evaluation), and the training seconds each run needs to reach
the baseline's final accuracy (the baseline's own: its whole budget, or less if it got there earlier).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from .common import RESULTS, ROOT, Recorder

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
TRAIN_TAR = os.path.join(DATA, "cifar10-train-10k.tar")
TEST_TAR = os.path.join(DATA, "cifar10-test-2k.tar")
RECIPE = "cifar10_quick_cpu"
GPU_RECIPE = "cifar10_resnet18_gpu"
RECIPES = (RECIPE, GPU_RECIPE)
GPU_TRAIN_TAR = os.path.join(DATA, "cifar10-train-50k.tar")
# lightly's CIFAR-10 benchmark (docs, "Benchmarks"): ResNet-18 SimCLR, batch 128, 200 epochs, kNN k = 200.
PUBLISHED = {"name": "lightly SimCLR R18 (published, A6000)", "knn_top1": 84.7, "minutes": 97.7}
CPU_SMOKE = ["model.width_mult=0.125", "model.proj_hidden_dim=128", "train.global_batch_size=64",
             "eval.max_eval_images=512", "eval.every_epochs=0", "checkpoint.every_epochs=0", "train.log_every=10",
             "data.num_threads=2", "data.prefetch=2"]
"""What the GPU recipe's time-to-accuracy run changes on a machine without a GPU: the same command, loader, loss,
budget and evaluation on a network small enough for a 1-minute smoke."""


def _data_overrides(train: str, test: str) -> list[str]:
    return [f"data.path={train}", f"data.eval_path={test}"]


def run_fastclr(minutes: float, out: str, train: str, test: str, extra=(), recipe: str = RECIPE
                ) -> list[tuple[float, float]]:
    """(training seconds, kNN top-1) of every evaluation of a real ``fastclr pretrain`` run."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "fastclr", "pretrain", "--config", recipe, *_data_overrides(train, test),
           f"train.time_budget_minutes={minutes}", "eval.baseline=false", "logging.progress=false",
           "logging.tensorboard=false", f"logging.dir={out}", f"checkpoint.dir={out}/ckpt", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=minutes * 60 * 3 + 600)
    if proc.returncode != 0:
        raise RuntimeError(f"fastclr run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [(r["train_s"], r["knn_top1"]) for r in rows if r["kind"] == "eval" and "knn_top1" in r]


def run_plain(minutes: float, cfg, train: str, test: str, threads: int) -> list[tuple[float, float]]:
    """The baseline trained for ``minutes`` of training time; (training seconds, kNN top-1) at the evaluations."""
    import tarfile

    import torch

    from fastclr.budget import Costs, fit_warmup, total_steps
    from fastclr.data import build_eval_loader
    from fastclr.eval import evaluate_encoder
    from fastclr.models import build_model
    from fastclr.optim import Schedule

    from .pil_augment import pil_loader
    from .plain_simclr import Step

    torch.set_num_threads(threads)
    with tarfile.open(train) as tf:
        encoded = [tf.extractfile(m).read() for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")]
    b = cfg.train.global_batch_size
    loader = pil_loader(encoded, cfg.data.augment, cfg.data.image_size, batch_size=b, workers=threads)
    steps_per_epoch = len(encoded) // b
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    schedule = Schedule.of(cfg, steps_per_epoch, b)  # provisional length; decided after the warm-up steps below
    step_fn = Step(model, temperature=cfg.loss.temperature, lr=schedule.peak_lr)
    for g in step_fn.opt.param_groups:
        g["weight_decay"] = cfg.optim.weight_decay
    kw = dict(batch_size=256, device=torch.device("cpu"), channels_last=False)
    eval_loaders = (build_eval_loader(cfg.data, "train", **kw), build_eval_loader(cfg.data, "test", **kw))
    e = cfg.eval

    def evaluate():
        return evaluate_encoder(model, *eval_loaders, torch.device("cpu"), knn_k=e.knn_k,
                                knn_temperature=e.knn_temperature, probe_epochs=0, probe_lr=e.probe_lr)["knn_top1"]

    budget_s, train_s, step, points = minutes * 60.0, 0.0, 0, []
    measure_from, measure_at = 2, min(schedule.warmup_steps, 22)
    t_measure, eval_s, decided = 0.0, 0.0, None  # decided: (step, training seconds) at the decision
    t_last = t_start = time.monotonic()  # training time runs from here, waits for the loader included

    max_total = schedule.total_steps  # train.epochs: the longest run a budget may choose

    def plan(costs, pending_s: float = 0.0) -> int:
        return min(max_total, total_steps(
            budget_s=budget_s, elapsed_s=time.monotonic() - t_start + pending_s, step=step,
            steps_per_epoch=steps_per_epoch, costs=costs, final_evaluations=1, monitor_every_epochs=e.every_epochs,
            checkpoint_every_epochs=0, checkpoint_every_steps=0))

    def monitor():
        nonlocal t_last
        t0 = time.monotonic()
        points.append((train_s, evaluate()))
        t_last = time.monotonic()
        return t_last - t0

    while step < schedule.total_steps:
        for view_a, view_b in loader:
            for g in step_fn.opt.param_groups:
                g["lr"] = schedule(step)
            step_fn(view_a, view_b)
            step += 1
            now = time.monotonic()
            train_s, t_last = train_s + (now - t_last), now
            if step == measure_from:
                t_measure = train_s
            if step == measure_at and decided is None:  # fastclr.budget's decision: speed, one evaluation
                eval_s = monitor()
                total, warmup = fit_warmup(plan(Costs((train_s - t_measure) / (measure_at - measure_from), eval_s,
                                                      0.0)), schedule.warmup_steps, step)
                schedule = Schedule(total, warmup, schedule.peak_lr, schedule.final_lr)
                decided = (step, train_s)
            elif decided is not None and step % steps_per_epoch == 0 and step < 0.95 * schedule.total_steps:
                # fastclr.budget's re-plan: the speed since the decision, the rest of the cosine fitted in
                speed = (train_s - decided[1]) / (step - decided[0])
                pending = eval_s if e.every_epochs and step % (e.every_epochs * steps_per_epoch) == 0 else 0.0
                total = plan(Costs(speed, eval_s, 0.0), pending)
                if total != schedule.total_steps:
                    schedule = (schedule.rescaled(step, total) if step >= schedule.warmup_steps else
                                Schedule(*fit_warmup(total, schedule.warmup_steps, step), schedule.peak_lr,
                                         schedule.final_lr))
            if e.every_epochs and step % (e.every_epochs * steps_per_epoch) == 0 and step < schedule.total_steps:
                monitor()
            if step >= schedule.total_steps:
                break
    points.append((train_s, evaluate()))
    return points


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    """Training seconds at which the curve first reaches ``target`` (linear between evaluations), None if never."""
    prev = (0.0, 0.0)
    for t, acc in points:
        if acc >= target:
            t0, a0 = prev
            return t0 + (t - t0) * (target - a0) / (acc - a0) if acc > a0 else t
        prev = (t, acc)
    return None


def run(rec: Recorder, *, quick: bool = False, smoke: bool = False, out_dir: str | None = None,
        minutes: float | None = None, seed: int | None = None, recipe: str = RECIPE) -> dict:
    from fastclr.config import load_config

    from .common import bench_threads

    if recipe not in RECIPES:
        raise ValueError(f"the time-to-accuracy benchmark runs the recipes {RECIPES}, got {recipe!r}")
    if recipe == GPU_RECIPE:
        return run_target(rec, out_dir=out_dir, minutes=minutes, seed=seed)
    if not (os.path.isfile(TRAIN_TAR) and os.path.isfile(TEST_TAR)):
        raise FileNotFoundError(f"the time-to-accuracy benchmark needs the CIFAR tars at {TRAIN_TAR} and {TEST_TAR}")
    minutes = minutes or (0.5 if smoke else 2.0 if quick else 10.0)
    out = tempfile.mkdtemp(prefix="fastclr-tta-", dir=out_dir)
    seeded = [] if seed is None else [f"seed={seed}"]
    fast = run_fastclr(minutes, os.path.join(out, "fastclr"), TRAIN_TAR, TEST_TAR, seeded)
    cfg = load_config(RECIPE, _data_overrides(TRAIN_TAR, TEST_TAR) + seeded)
    plain = run_plain(minutes, cfg, TRAIN_TAR, TEST_TAR, bench_threads())
    group, shape = f"tta cifar10 {minutes:g} min", (f"{cfg.model.arch} x{cfg.model.width_mult:g}, batch "
                                                    f"{cfg.train.global_batch_size}, 10k CIFAR-10 JPEGs, kNN k={cfg.eval.knn_k}")
    rec.add(benchmark="tta", group=group, variant="plain-pytorch", role="baseline", shape=shape, dtype="float32",
            unit="% kNN top-1", value=plain[-1][1], curve=plain)
    from fastclr.config.run import precision_name

    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision_name(cfg), "float32")
    rec.add(benchmark="tta", group=group, variant="fastclr", role="fastclr", shape=shape, dtype=dtype,
            unit="% kNN top-1", value=fast[-1][1], curve=fast)
    target = plain[-1][1]
    reach = {"fastclr": time_to(fast, target), "plain-pytorch": time_to(plain, target) or plain[-1][0]}
    for variant, role in (("plain-pytorch", "baseline"), ("fastclr", "fastclr")):
        if reach[variant] is not None:
            rec.add(benchmark="tta", group=f"time to {target:.1f}% kNN", variant=variant, role=role, shape=shape,
                    dtype="-", unit="s", value=reach[variant])
    return {"fastclr": fast, "plain-pytorch": plain, "minutes": minutes, "reach": reach, "target": target}


def run_target(rec: Recorder, *, out_dir: str | None = None, minutes: float | None = None,
               seed: int | None = None) -> dict:
    """The GPU recipe against the published mark; without CUDA a 1-minute smoke of the same command."""
    import torch

    if not (os.path.isfile(GPU_TRAIN_TAR) and os.path.isfile(TEST_TAR)):
        raise FileNotFoundError(f"the GPU time-to-accuracy run needs the CIFAR tars at {GPU_TRAIN_TAR} and {TEST_TAR}")
    cuda = torch.cuda.is_available()
    minutes = minutes or (10.0 if cuda else 1.0)
    extra = ([] if cuda else CPU_SMOKE) + ([] if seed is None else [f"seed={seed}"])
    out = tempfile.mkdtemp(prefix="fastclr-tta-gpu-", dir=out_dir)
    curve = run_fastclr(minutes, os.path.join(out, "fastclr"), GPU_TRAIN_TAR, TEST_TAR, extra, recipe=GPU_RECIPE)
    target, mark_s = PUBLISHED["knn_top1"], PUBLISHED["minutes"] * 60.0
    kind = "" if cuda else " (CPU smoke: " + " ".join(CPU_SMOKE[:3]) + ")"
    group = f"tta cifar10 50k {minutes:g} min{kind}"
    shape = f"resnet18 x1 CIFAR stem, batch 512, 50k CIFAR-10 JPEGs, kNN k=200 on 2k test images{kind}"
    rec.add(benchmark="tta", group=group, variant=PUBLISHED["name"], role="baseline", shape=shape, dtype="-",
            unit="% kNN top-1", value=target, published=True, seconds=mark_s)
    rec.add(benchmark="tta", group=group, variant="fastclr", role="fastclr", shape=shape, dtype="-",
            unit="% kNN top-1", value=curve[-1][1], curve=curve, seconds=curve[-1][0])
    reach = time_to(curve, target)
    group_t = f"time to {target:.1f}% kNN{kind}"
    rec.add(benchmark="tta", group=group_t, variant=PUBLISHED["name"], role="baseline", shape=shape, dtype="-",
            unit="s", value=mark_s, published=True)
    if reach is not None:
        rec.add(benchmark="tta", group=group_t, variant="fastclr", role="fastclr", shape=shape, dtype="-", unit="s",
                value=reach)
    return {"fastclr": curve, "minutes": minutes, "reach": {"fastclr": reach, PUBLISHED["name"]: mark_s},
            "target": target, "published": PUBLISHED, "cuda": cuda}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, style in (("fastclr", "-o"), ("plain-pytorch", "--s")):
        pts = result.get(name)
        if pts:
            ax.plot([t / 60 for t, _ in pts], [a for _, a in pts], style, label=name)
    if "published" in result:
        ax.plot([result["published"]["minutes"]], [result["target"]], "k*", label=result["published"]["name"])
    ax.axhline(result["target"], color="gray", lw=0.6)
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(f"CIFAR-10 time to accuracy, {result['minutes']:g} min each", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None, help="budget of each run (default: 10; the GPU "
                                                                 "recipe without a GPU: 1)")
    p.add_argument("--seed", type=int, default=None, help="both runs' seed (default: the recipe's)")
    p.add_argument("--recipe", choices=RECIPES, default=RECIPE)
    p.add_argument("--out", default=os.path.join(RESULTS, "tta.jsonl"))
    args = p.parse_args(argv)
    rec = Recorder(args.out)
    result = run(rec, minutes=args.minutes, seed=args.seed, recipe=args.recipe)
    print(json.dumps({k: result[k] for k in ("minutes", "reach", "target")}), flush=True)
    for name in ("fastclr", "plain-pytorch"):
        if name in result:
            print(name, " ".join(f"{t:.0f}s:{a:.1f}%" for t, a in result[name]), flush=True)
    plot(result, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
