"""A full SimCLR step (two views: forward, NT-Xent, backward, LARS), images/s: fastclr against plain PyTorch.

    PYTHONPATH=. python -m benchmarks.train_step [--quick]

Per workload (ResNet-18 at 32 px with the CIFAR stem, batch 256; ResNet-50 at 224 px, a smaller batch on CPU):

* ``plain-pytorch`` (baseline): :mod:`benchmarks.plain_simclr`, fp32, NCHW, masked (2N × 2N) cross-entropy, LARS
  as a per-parameter loop;
* ``+channels_last``, ``+bf16``, ``+tiled_loss``, ``+multi_tensor_lars`` (ablation): the baseline with one of
  fastclr's techniques switched on, so each gain shows on its own;
* ``fastclr``: ``Trainer.train_step`` itself, the production step through the DeepSpeed engine (channels_last,
  ``precision.dtype=auto``: bf16 autocast where the device has bf16 units, fp32 on a CPU without, the loss the ``auto`` choice picks, multi-tensor LARS).

Inputs are fixed random views already in memory (data loading is the data benchmark's); the ``e2e`` group adds it
back: fastclr's trainer fed by its DALI loader against the baseline fed by the PIL DataLoader, from the same JPEGs.
The rate counts images (each contributes two views). Rows also carry the achieved FLOP/s from counted FLOPs.
"""
from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile

import torch

from fastclr.config.run import cpu_has_native_bf16

from .common import RESULTS, Recorder, bar_chart, bench_threads, ratio, time_calls
from .plain_simclr import TECHNIQUES, Step

DEFAULT_RECIPE = "default"


def workloads(quick: bool, smoke: bool, cuda: bool) -> list[dict]:
    if smoke:
        return [dict(name="resnet18 32px", arch="resnet18", cifar_stem=True, image_size=32, width_mult=0.125,
                     batch=16),
                dict(name="resnet50 64px", arch="resnet50", cifar_stem=False, image_size=64, width_mult=0.125,
                     batch=4)]
    r50_batch = 128 if cuda else (8 if quick else 16)
    return [dict(name="resnet18 32px", arch="resnet18", cifar_stem=True, image_size=32, width_mult=1.0,
                 batch=512 if cuda else 256),
            dict(name="resnet50 224px", arch="resnet50", cifar_stem=False, image_size=224, width_mult=1.0,
                 batch=r50_batch)]


def config_for(w: dict, run_dir: str, *extra: str):
    from fastclr.config import load_config

    return load_config(DEFAULT_RECIPE, [
        f"model.arch={w['arch']}", f"model.width_mult={w['width_mult']}", f"model.cifar_stem={w['cifar_stem']}",
        "model.proj_hidden_dim=2048", "model.proj_out_dim=128", f"data.image_size={w['image_size']}",
        f"train.global_batch_size={w['batch']}", "train.epochs=1000", "train.max_minutes=0", "precision.dtype=auto",
        "precision.channels_last=true", "loss.impl=auto", "logging.progress=false", "logging.tensorboard=false",
        "eval.baseline=false", f"logging.dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", *extra])


def fastclr_trainer(cfg):
    from fastclr import runtime
    from fastclr.config import validate_run
    from fastclr.trainer import Trainer

    plan = validate_run(cfg, 1, torch.cuda.is_available())
    return Trainer(cfg, runtime.setup("auto"), plan)


def _views(w: dict, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (w["batch"], 3, w["image_size"], w["image_size"])
    return torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)


def _baseline_model(cfg, device):
    from fastclr.models import build_model

    torch.manual_seed(0)
    return build_model(cfg.model).to(device)


def _jpeg_tar(n: int, folder: str) -> tuple[str, list[bytes]]:
    from .data import cifar_jpegs

    jpegs, _ = cifar_jpegs(n)
    path = os.path.join(folder, "train.tar")
    with tarfile.open(path, "w") as tf:
        for k, data in enumerate(jpegs):
            info = tarfile.TarInfo(f"train/c{k % 10}/{k:05d}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path, jpegs


def run(rec: Recorder, *, quick: bool = False, smoke: bool = False, flops: dict | None = None,
        e2e: bool = True, ablation: bool = True) -> list[dict]:
    from .flops import build, count

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    threads = bench_threads()
    if not cuda:
        torch.set_num_threads(threads)
    repeats, ablation_repeats = (2, 1) if smoke else (3, 3) if quick else (5, 5)
    rows = []
    tmp = tempfile.mkdtemp(prefix="fastclr-bench-")
    for w in workloads(quick, smoke, cuda):
        group, b = f"step {w['name']} b{w['batch']}", w["batch"]
        shape = f"{w['name']} width {w['width_mult']:g} batch {b} (2x{b} views)"
        key = w["name"]
        if flops is None or key not in flops:
            flops = dict(flops or {}, **{key: count(build(w["arch"], w["cifar_stem"], w["width_mult"]),
                                                     w["image_size"])})
        train_flops = flops[key][1] * 2 * b  # per step: forward + backward of 2·b views

        def record(variant, role, times, dtype):
            return rows.append(rec.add(benchmark="train_step", group=group, variant=variant, role=role, shape=shape,
                                       dtype=dtype, unit="images/s", values=[b / t for t in times],
                                       step_s_median=sorted(times)[len(times) // 2],
                                       achieved_tflops=train_flops / sorted(times)[len(times) // 2] / 1e12))

        cfg = config_for(w, os.path.join(tmp, key.replace(" ", "_")))
        view_a, view_b = _views(w, device)
        step = Step(_baseline_model(cfg, device))
        record("plain-pytorch", "baseline", time_calls(lambda: step(view_a, view_b), repeats=repeats, device=device),
               "float32")
        del step
        ablations = () if (not ablation or (quick and "50" in w["arch"])) else TECHNIQUES
        if not cuda and not smoke and not cpu_has_native_bf16():
            # Emulated bf16 (no AVX512-BF16/AMX) measured 17x slower than fp32: precision.dtype=auto never picks it
            # here, so timing it would only spend minutes on a path fastclr does not take.
            print("train_step: no bf16 units on this CPU: the +bf16 ablation is skipped (auto precision is fp32)")
            ablations = tuple(t for t in ablations if t != "bf16")
        for technique in ablations:
            step = Step(_baseline_model(cfg, device), on=(technique,))
            record(f"+{technique}", "ablation",
                   time_calls(lambda: step(view_a, view_b), repeats=ablation_repeats, device=device),
                   "bfloat16" if technique == "bf16" else "float32")
            del step
        trainer = fastclr_trainer(cfg)
        fa = view_a.to(trainer.batch_dtype).contiguous(memory_format=torch.channels_last)
        fb = view_b.to(trainer.batch_dtype).contiguous(memory_format=torch.channels_last)
        eager = time_calls(lambda: trainer.train_step([(fa, fb)]), repeats=repeats, device=device)
        fdtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(trainer.batch_dtype, "float32")
        record("fastclr", "fastclr", eager, fdtype)
        trainer.close()
        del trainer
        if "18" in w["arch"] and not smoke:  # compiling costs about a minute here; tests/test_compile covers it
            # torch.compile of the same step (model.compile=true; the default on CUDA only): two warm-up calls hold
            # the compilation, then the same repeats. Recorded beside the eager times of this same run.
            trainer = fastclr_trainer(config_for(w, os.path.join(tmp, key.replace(" ", "_") + "_compiled"),
                                                 "model.compile=true"))
            compiled = time_calls(lambda: trainer.train_step([(fa, fb)]), repeats=repeats, warmup=2, device=device)
            trainer.close()
            del trainer
            for variant, role, times in (("eager", "baseline", eager), ("compiled", "fastclr", compiled)):
                rows.append(rec.add(benchmark="train_step", group=f"compile {w['name']} b{b}", variant=variant,
                                    role=role, shape=shape, dtype=fdtype, unit="images/s",
                                    values=[b / t for t in times]))

    if e2e:
        rows.extend(_end_to_end(rec, workloads(quick, smoke, cuda)[0], tmp, device, threads,
                                repeats=ablation_repeats if not smoke else 1))
    return rows


def _end_to_end(rec, w, tmp, device, threads, repeats) -> list[dict]:
    """Data loading included: fastclr's trainer on its DALI loader vs the baseline on the PIL DataLoader."""
    from fastclr.config import AugmentConfig

    from .pil_augment import pil_loader

    b = w["batch"]
    n = max(4 * b, 256)
    tar, jpegs = _jpeg_tar(n, tmp)
    group = f"e2e {w['name']} b{b}"
    shape = f"{w['name']} width {w['width_mult']:g} batch {b}, JPEG decode + two-view augmentation included"
    rows = []
    cfg = config_for(w, os.path.join(tmp, "e2e"), "data.dataset=tar", f"data.path={tar}", f"data.eval_path={tar}",
                     f"data.num_threads={threads}")
    aug = AugmentConfig(**{**cfg.data.augment.__dict__})

    step = Step(_baseline_model(cfg, device))
    loader = pil_loader(jpegs, aug, w["image_size"], batch_size=b, workers=threads)

    def batches():
        while True:
            yield from loader

    it = batches()

    def baseline_step():
        a, bb = next(it)
        step(a.to(device, non_blocking=True), bb.to(device, non_blocking=True))

    times = time_calls(baseline_step, repeats=repeats, device=device)
    rows.append(rec.add(benchmark="train_step", group=group, variant="plain-pytorch + pil-dataloader",
                        role="baseline", shape=shape, dtype="float32", unit="images/s", values=[b / t for t in times]))
    del loader, it, step

    trainer = fastclr_trainer(cfg)

    def fastclr_step():
        trainer.train_step(trainer.next_micro_batches())

    times = time_calls(fastclr_step, repeats=repeats, device=device)
    rows.append(rec.add(benchmark="train_step", group=group, variant="fastclr + dali", role="fastclr", shape=shape,
                        dtype="bfloat16", unit="images/s", values=[b / t for t in times]))
    trainer.close()
    return rows


def summary_lines(rows: list[dict]) -> list[str]:
    out = []
    for group in dict.fromkeys(r["group"] for r in rows if r["benchmark"] == "train_step"):
        base = [r["variant"] for r in rows if r["group"] == group and r["role"] == "baseline"][0]
        for r in rows:
            if r["group"] == group and r["role"] != "baseline":
                q = ratio(rows, group, r["variant"], base)
                out.append(f"{group}: {r['variant']} / {base} = {q:.2f}x")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--no-ablation", action="store_true", help="only the baseline, fastclr and compiled rows")
    p.add_argument("--out", default=os.path.join(RESULTS, "train_step.jsonl"))
    args = p.parse_args(argv)
    rec = Recorder(args.out)
    rows = run(rec, quick=args.quick, smoke=args.smoke, e2e=not args.no_e2e, ablation=not args.no_ablation)
    bar_chart(rows, os.path.splitext(args.out)[0] + ".png", f"SimCLR step, {rec.base['device_name']}")
    for line in summary_lines(rows):
        print(line)


if __name__ == "__main__":
    main()
