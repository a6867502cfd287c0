"""What every benchmark shares: the JSONL row schema, timing with medians, the machine's description, bar charts.

Row schema (one JSON object per line; ``SCHEMA`` lists the keys every row has):

* ``benchmark``  which benchmark wrote it (``train_step``, ``data``, ``ntxent``, ``lars``, ``breakdown``, ...)
* ``group``      the comparison it belongs to: rows of one group ran side by side in one run on the same inputs
* ``variant``    what ran (``fastclr``, ``plain-pytorch``, ``+channels_last``, ``pil-dataloader``, ...)
* ``role``       ``fastclr`` | ``baseline`` | ``ablation`` | ``measure`` (a figure with nothing to compare against)
* ``shape``      the workload in words (``resnet18 32px batch 256``), ``dtype``
* ``device``     ``cpu`` | ``cuda``; ``device_name`` (CPU model or GPU name), ``threads``
* ``commit``, ``timestamp``
* ``median``, ``p25``, ``p75``, ``repeats``, ``unit``: the measurement (higher is better for rates: ``images/s``;
  lower for times: ``s``, ``ms``)
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

SCHEMA = ("benchmark", "group", "variant", "role", "shape", "dtype", "device", "device_name", "threads", "commit",
          "timestamp", "median", "p25", "p75", "repeats", "unit")
ROLES = ("fastclr", "baseline", "ablation", "measure")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return ""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_info() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "device_name": torch.cuda.get_device_name()}
    return {"device": "cpu", "device_name": f"{cpu_name()} ({os.cpu_count()} cores)"}


def bench_threads() -> int:
    """CPU threads every benchmark may use (``FASTCLR_BENCH_THREADS``, default: all cores)."""
    return int(os.environ.get("FASTCLR_BENCH_THREADS", os.cpu_count() or 1))


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75) of ``xs``."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], *, repeats: int, warmup: int = 1, device="cpu",
               setup: Callable[[], object] | None = None) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones: the one timing loop of every
    benchmark. ``setup`` runs before each call, untimed (fresh gradients, a barrier). On CUDA each call is timed
    with events around it and a synchronization after it; on the CPU with the monotonic performance counter."""
    import torch

    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        if setup is not None:
            setup()
            sync(device)
        if str(device).startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


class Recorder:
    """Collects rows, appends each to a JSONL file as it comes (a crash keeps what was measured)."""

    def __init__(self, path: str | None, *, run_stamp: str | None = None, quiet: bool = False):
        self.path, self.rows, self.quiet = path, [], quiet
        self.base = {"commit": commit(), "timestamp": run_stamp or time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "threads": bench_threads(), **device_info()}
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def add(self, *, benchmark: str, group: str, variant: str, role: str, shape: str, dtype: str, unit: str,
            values: list[float] | None = None, value: float | None = None, **extra) -> dict:
        """One row from raw ``values`` (quantiles taken here) or a single ``value``."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got '{role}'")
        if values is None:
            values = [value]
        p25, med, p75 = quantiles(values)
        row = {"benchmark": benchmark, "group": group, "variant": variant, "role": role, "shape": shape,
               "dtype": dtype, **self.base, "median": med, "p25": p25, "p75": p75, "repeats": len(values),
               "unit": unit, **extra}
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if not self.quiet:
            print(f"  {benchmark:>10} | {group:<34} | {variant:<22} | {med:10.4g} {unit}"
                  f" (p25 {p25:.4g}, p75 {p75:.4g}, n={len(values)})", flush=True)
        return row


def ratio(rows: list[dict], group: str, num: str, den: str) -> float | None:
    """median(variant ``num``) / median(variant ``den``) within ``group``; None if either is missing."""
    by = {r["variant"]: r["median"] for r in rows if r["group"] == group}
    if num in by and den in by and by[den]:
        return by[num] / by[den]
    return None


def bar_chart(rows: list[dict], path: str, title: str) -> None:
    """One panel per group, one bar per variant (median with p25–p75 whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in rows))
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    colors = {"fastclr": "tab:blue", "baseline": "tab:gray", "ablation": "tab:cyan", "measure": "tab:olive"}
    for ax, group in zip(axes[0], groups):
        rs = [r for r in rows if r["group"] == group]
        x = range(len(rs))
        ax.bar(x, [r["median"] for r in rs], color=[colors[r["role"]] for r in rs],
               yerr=[[r["median"] - r["p25"] for r in rs], [r["p75"] - r["median"] for r in rs]], capsize=3)
        ax.set_xticks(list(x), [r["variant"] for r in rs], rotation=30, ha="right", fontsize=8)
        ax.set_title(group, fontsize=9)
        ax.set_ylabel(rs[0]["unit"])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
