"""LARS step: the multi-tensor (foreach) path against per-tensor loops, on ResNet-50 + SimCLR projection head.

Two loops: the *same-kernel loop* (fastclr's own operators, in place, one tensor at a time: isolates what the
multi-tensor dispatch changes) and, in the suite (``python -m benchmarks``), the *per-parameter loop* users run today
(:class:`benchmarks.plain_simclr.PlainLARS`, out-of-place temporaries as in the public implementations).

Times ``LARS.step()`` alone and counts the ATen operator calls one step dispatches; on CUDA it also counts the GPU
work items (kernels, memcpy, memset) one step launches, which is what the multi-tensor path exists to cut.

Both variants step the very same tensors — one model, one optimizer whose groups' ``foreach`` flag is switched — so
that where the allocator happened to place two copies of 28M parameters cannot favour either (two separate copies
differed by up to 10% on identical work here). Steps alternate A B B A ..., gradients are refilled before each step
outside the timed region (the step consumes ``.grad``), and every step starts from the same gradients.

    PYTHONPATH=. python benchmarks/lars.py [--quick] [--arch resnet50] [--out benchmarks/results/lars.jsonl]

Each variant appends one JSON row to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import commit as _commit
from benchmarks.common import time_calls
from fastclr.models import ProjectionHead, SimCLRModel, build_backbone
from fastclr.optim import LARS, param_groups

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lars.jsonl")
VARIANTS = (("foreach", True), ("loop", False))
PLAIN = "plain"
"""The public-style per-parameter LARS (benchmarks.plain_simclr.PlainLARS), stepping the same tensors."""


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.namespace == "aten"  # not the profiler's record_function markers around Optimizer.step
        return func(*args, **(kwargs or {}))


def count_dispatched_ops(fn: Callable[[], object]) -> int:
    """ATen operator calls ``fn()`` sends to the dispatcher.

    Counted with a ``TorchDispatchMode`` rather than by walking a profiler trace: the mode sees each call that
    reaches a backend kernel exactly once (composite operators as the primitives they decompose into), and is
    switched off while a call runs, so the per-tensor calls a foreach operator's CPU fallback makes internally are
    not counted — on CUDA those are the single multi-tensor kernel they stand for. No trace parsing, no heuristic
    for "top-level" events, and the count does not depend on the device. View operators (``unbind``) count too.
    """
    with _OpCounter() as counter:
        fn()
    return counter.calls


def count_gpu_launches(fn: Callable[[], object]) -> int:
    """GPU work items (kernels, memcpy, memset) ``fn()`` launches, from the profiler's device-side events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    # Device-side ranges mirroring record_function scopes are annotations, not launches.
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation)


class _Bench:
    """One model and one LARS on its parameter groups; ``step(foreach)`` runs either path on the same tensors."""

    def __init__(self, arch: str, device: torch.device):
        torch.manual_seed(0)
        backbone = build_backbone(arch)
        model = SimCLRModel(backbone, ProjectionHead(backbone.feature_dim, 2048, 128))
        model = model.to(device, memory_format=torch.channels_last)  # the training layout (DESIGN decision 3)
        # SimCLR at batch 4096: LR 0.3·4096/256, weight decay 1e-6, η = 0.001 (Chen et al. 2020, appendix B.9).
        self.opt = LARS(param_groups(model, 1e-6), lr=4.8, momentum=0.9, trust_coefficient=1e-3)
        self.params = [p for group in self.opt.param_groups for p in group["params"]]
        from benchmarks.plain_simclr import PlainLARS

        self.plain = PlainLARS(self.params, lr=4.8, momentum=0.9, weight_decay=1e-6, eta=1e-3)
        self.fresh = [torch.randn_like(p).mul_(1e-2) for p in self.params]
        # The gradients in flat buckets, as the trainer's overlapped all-reduce keeps them (one rank: no collective):
        # LARS's non-finite guard then sanitizes a few tensors, not one per parameter.
        from fastclr.allreduce import GradientBuckets

        buckets = GradientBuckets(model.parameters(), world_size=1)
        buckets.prepare()
        self.opt.grad_buffers = buckets.flat
        for p, g in zip(self.params, self.fresh):
            p.grad.copy_(g)
        self.grads = [p.grad for p in self.params]
        self.device = device

    def prepare(self, foreach) -> None:
        for group in self.opt.param_groups:
            group["foreach"] = foreach is True
        torch._foreach_copy_(self.grads, self.fresh)

    def optimizer(self, foreach):
        return self.plain if foreach == PLAIN else self.opt

    def timed_step(self, foreach) -> float:
        """Seconds of one step; the gradients are refilled before it, untimed."""
        return time_calls(self.optimizer(foreach).step, repeats=1, warmup=0, device=self.device,
                          setup=lambda: self.prepare(foreach))[0]


def _parse(argv):
    ap = argparse.ArgumentParser(prog="benchmarks/lars.py", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50", help="backbone (fastclr.models.ARCHS); default resnet50")
    ap.add_argument("--device", default=None, help="cpu or cuda; default cuda when available")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, this machine's cores)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 25, --quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 3, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run, not a measurement")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSONL file the rows are appended to")
    args = ap.parse_args(argv)
    args.repeats = args.repeats if args.repeats is not None else (5 if args.quick else 25)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        ap.error(f"--repeats must be >= 1, --warmup >= 0 and --threads >= 1; got {args.repeats}, {args.warmup}, "
                 f"{args.threads}")
    if args.device not in (None, "cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    return args


def _iqr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q3 - q1


def main(argv=None) -> list[dict]:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({args.threads} threads)"
    bench = _Bench(args.arch, device)

    for _ in range(args.warmup):
        for _, foreach in VARIANTS:
            bench.timed_step(foreach)
    times = {name: [] for name, _ in VARIANTS}
    for i in range(args.repeats):
        for name, foreach in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:  # A B B A: neither always goes first
            times[name].append(bench.timed_step(foreach))

    rows, stamp, commit = [], datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), _commit()
    for name, foreach in VARIANTS:
        bench.prepare(foreach)
        ops = count_dispatched_ops(bench.opt.step)
        launches = None
        if device.type == "cuda":
            bench.prepare(foreach)
            launches = count_gpu_launches(bench.opt.step)
        rows.append(dict(benchmark="lars", variant=name, arch=args.arch, n_tensors=len(bench.params),
                         n_params=sum(p.numel() for p in bench.params), median_s=statistics.median(times[name]),
                         iqr_s=_iqr(times[name]), ops_per_step=ops, gpu_launches_per_step=launches,
                         device=device_name, threads=args.threads, repeats=args.repeats, torch=torch.__version__,
                         commit=commit, timestamp=stamp))
    _print_table(rows, args, device_name)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def run(rec, *, quick: bool = False, smoke: bool = False) -> list[dict]:
    """The suite's entry: the per-tensor loop (baseline) against the multi-tensor step, time and operator calls."""
    arch, repeats, warmup = ("resnet18", 3, 1) if smoke else ("resnet50", 9, 2) if quick else ("resnet50", 25, 3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = _Bench(arch, device)
    for _ in range(warmup):
        for _, foreach in VARIANTS:
            bench.timed_step(foreach)
    variants = VARIANTS + ((PLAIN, PLAIN),)
    times = {name: [] for name, _ in variants}
    for i in range(repeats):
        for name, foreach in variants if i % 2 == 0 else variants[::-1]:
            times[name].append(bench.timed_step(foreach))
    shape = f"{arch} + head: {len(bench.params)} tensors, {sum(p.numel() for p in bench.params) / 1e6:.1f}M params"
    names = {True: ("multi-tensor", "fastclr"), False: ("same-kernel loop", "baseline"),
             PLAIN: ("per-parameter loop", "baseline")}
    out = []
    for name, foreach in variants:
        variant, role = names[foreach]
        bench.prepare(foreach)
        ops = count_dispatched_ops(bench.optimizer(foreach).step)
        out.append(rec.add(benchmark="lars", group=f"lars step {arch}", variant=variant, role=role, shape=shape,
                           dtype="float32", unit="ms", values=[t * 1e3 for t in times[name]]))
        out.append(rec.add(benchmark="lars", group=f"lars operator calls {arch}", variant=variant, role=role,
                           shape=shape, dtype="float32", unit="ops/step", value=ops))
        if device.type == "cuda":
            bench.prepare(foreach)
            out.append(rec.add(benchmark="lars", group=f"lars GPU launches {arch}", variant=variant, role=role,
                               shape=shape, dtype="float32", unit="launches/step",
                               value=count_gpu_launches(bench.optimizer(foreach).step)))
    return out


def _print_table(rows: list[dict], args, device_name: str) -> None:
    gpu = rows[0]["gpu_launches_per_step"] is not None
    print(f"LARS step, {args.arch} + projection head: {rows[0]['n_tensors']} tensors, "
          f"{rows[0]['n_params'] / 1e6:.2f}M params, {device_name}, median of {args.repeats} steps")
    print(f"{'variant':<9}{'median ms':>11}{'IQR ms':>9}{'ops/step':>10}" + (f"{'GPU launches':>14}" if gpu else ""))
    for r in rows:
        print(f"{r['variant']:<9}{r['median_s'] * 1e3:>11.2f}{r['iqr_s'] * 1e3:>9.2f}{r['ops_per_step']:>10d}"
              + (f"{r['gpu_launches_per_step']:>14d}" if gpu else ""))
    fe, lp = rows
    ratios = [f"time {fe['median_s'] / lp['median_s']:.3f}x", f"ops {fe['ops_per_step'] / lp['ops_per_step']:.3f}x"]
    if gpu:
        ratios.append(f"GPU launches {fe['gpu_launches_per_step'] / lp['gpu_launches_per_step']:.3f}x")
    print("foreach/loop: " + ", ".join(ratios))


if __name__ == "__main__":
    main(sys.argv[1:])
