"""When does the first gradient bucket become ready for its all-reduce, relative to the end of backward? And what
does compiling per region cost in step time?

    PYTHONPATH=. python -m benchmarks.overlap [--steps 8] [--backend aot_eager] [--width 0.25] [--batch 64]
    PYTHONPATH=. python -m benchmarks.overlap --step-speed     # trainer steps: eager, whole, regions, eager again

The all-reduce of a bucket starts from the post-accumulate-grad hooks of its parameters (fastclr.allreduce); it can
overlap backward only if those hooks fire while backward still runs. Three ways to run the same SimCLR network
(ResNet-18 with the CIFAR stem, projection head, NT-Xent, channels_last, fp32) are compared in one process:

* ``eager``: no compile (the reference: hooks fire as each layer's gradient is accumulated);
* ``whole``: ``torch.compile`` of the whole network — its backward is one autograd node, and every hook waits for it;
* ``regions``: fastclr's ``compile_regions`` — one compiled graph per residual block and for the head.

For each: the milliseconds between the first bucket becoming complete (the head's and last blocks' parameters, the
first 1 MB as in fastclr.allreduce.GradientBuckets) and ``backward()`` returning, and the backward time itself;
medians over the timed steps after compile warm-up. ``aot_eager`` (the default here) traces forward and backward
exactly as inductor does but runs them with ATen kernels, so the hook timing is the compiled one without minutes of
C++ compilation on a CPU.

``--step-speed``: images/s of fastclr's own training step (ResNet-18 32 px, batch 256, the trainer on one rank,
``precision.dtype=auto``, inductor) eager, compiled whole, compiled per region, and eager once more, in one process,
medians of 4 steps after 2 warm-up steps (which hold the compilation).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

MODES = ("eager", "whole", "regions")


def _network(width: float):
    from fastclr.config import load_config
    from fastclr.models import build_model

    torch.manual_seed(0)
    cfg = load_config("default", ["model.arch=resnet18", f"model.width_mult={width}", "model.cifar_stem=true"])
    return build_model(cfg.model).to(memory_format=torch.channels_last)


def measure(mode: str, *, steps: int = 8, warmup: int = 2, backend: str = "aot_eager", width: float = 0.25,
            batch: int = 64, image_size: int = 32) -> dict:
    """{mode, first_bucket_before_end_ms, backward_ms, first_bucket_fraction}: medians over ``steps`` timed steps.
    ``first_bucket_fraction`` is the share of backward still to run when the first bucket became ready."""
    from fastclr.allreduce import GradientBuckets
    from fastclr.engine import compile_regions
    from fastclr.losses import nt_xent

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    torch._dynamo.reset()
    model = _network(width)
    if mode == "whole":
        model.compile(backend=backend)
    elif mode == "regions":
        compile_regions(model, backend=backend)
    grads = GradientBuckets(model.parameters(), world_size=2, overlap=True)  # the layout only: nothing is armed
    first = grads.buckets[0]
    ready: list[float] = []
    pending = [len(first.params)]

    def hook(_p):
        pending[0] -= 1
        if pending[0] == 0:
            ready.append(time.perf_counter())

    for p in first.params:
        p.register_post_accumulate_grad_hook(hook)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * batch, 3, image_size, image_size, generator=g).contiguous(memory_format=torch.channels_last)
    before, backward = [], []
    for i in range(warmup + steps):
        grads.prepare()
        pending[0], ready[:] = len(first.params), []
        loss = nt_xent(*model(x).chunk(2), temperature=0.2, impl="tiled")
        t0 = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        if i >= warmup:
            assert len(ready) == 1, "the first bucket's hooks did not all fire"
            before.append((t1 - ready[0]) * 1e3)
            backward.append((t1 - t0) * 1e3)
    b, total = statistics.median(before), statistics.median(backward)
    return {"mode": mode, "first_bucket_before_end_ms": b, "backward_ms": total, "first_bucket_fraction": b / total}


def step_speed(variants=("eager", "whole", "regions", "eager"), batch: int = 256, repeats: int = 4) -> list:
    """[(variant, images/s, dtype)] of the trainer's step on one rank, each variant a fresh trainer."""
    import tempfile

    import fastclr.engine as engine

    from .common import bench_threads, time_calls
    from .train_step import _views, config_for, fastclr_trainer

    torch.set_num_threads(bench_threads())
    w = dict(name="resnet18 32px", arch="resnet18", cifar_stem=True, image_size=32, width_mult=1.0, batch=batch)
    view_a, view_b = _views(w, "cpu")
    chosen = engine.compile_network
    out = []
    try:
        for variant in variants:
            if variant not in ("eager", "whole", "regions"):
                raise ValueError(f"variant must be eager, whole or regions, got {variant!r}")
            # One rank compiles the whole network; 'regions' asks for what several ranks get.
            engine.compile_network = chosen if variant != "regions" else (
                lambda model, world, overlap, **kw: (engine.compile_regions(model, **kw), "regions")[1])
            torch._dynamo.reset()
            trainer = fastclr_trainer(config_for(w, tempfile.mkdtemp(), f"model.compile={variant != 'eager'}"))
            a = view_a.to(trainer.batch_dtype).contiguous(memory_format=torch.channels_last)
            b = view_b.to(trainer.batch_dtype).contiguous(memory_format=torch.channels_last)
            times = time_calls(lambda: trainer.train_step([(a, b)]), repeats=repeats, warmup=2, device="cpu")
            out.append((variant, batch / statistics.median(times), str(trainer.batch_dtype).replace("torch.", "")))
            trainer.close()
            del trainer
    finally:
        engine.compile_network = chosen
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overlap", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--backend", default="aot_eager", help="torch.compile backend (default: %(default)s)")
    p.add_argument("--width", type=float, default=0.25, help="ResNet-18 width multiplier")
    p.add_argument("--batch", type=int, default=64, help="images per view")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--step-speed", action="store_true", help="time the trainer's step eager / whole / regions instead")
    a = p.parse_args(argv)
    from .common import cpu_name

    if a.step_speed:
        rows = step_speed()
        print(f"fastclr train step, ResNet-18 32 px b256, one rank, inductor, {torch.get_num_threads()} threads, "
              f"{cpu_name()}; medians of 4 steps")
        for variant, ips, dtype in rows:
            print(f"{variant:<8} {ips:8.1f} images/s  ({dtype})", flush=True)
        return 0

    print(f"first gradient bucket ready vs end of backward, ResNet-18 x{a.width} CIFAR stem, 2x{a.batch} images, "
          f"{torch.get_num_threads()} threads, {cpu_name()}, backend {a.backend}; medians of {a.steps} steps")
    print(f"{'mode':<8} {'ready before end (ms)':>22} {'backward (ms)':>14} {'share of backward':>18}")
    for mode in a.modes:
        r = measure(mode, steps=a.steps, backend=a.backend, width=a.width, batch=a.batch)
        print(f"{mode:<8} {r['first_bucket_before_end_ms']:>22.1f} {r['backward_ms']:>14.1f} "
              f"{100 * r['first_bucket_fraction']:>17.0f}%", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
