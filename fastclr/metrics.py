"""Run metrics: CSV + JSONL rows, TensorBoard scalars, per-phase step timers, the log window and a progress display.

Only rank 0 writes. Values arrive as Python floats: the trainer turns tensors into numbers at log steps only, since
every ``.item()`` is a host sync.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
import time


class MetricsLogger:
    """Appends one row per log call to ``metrics.jsonl`` and ``metrics.csv`` (``kind`` separates train/eval rows)."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self._tb = None
        self._csv_fields: list[str] | None = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; a broken install only loses the TB view
                logging.getLogger(__name__).warning("tensorboard not importable; metrics go to CSV/JSONL only")

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": time.time(), **values}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._append_csv(row)
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def _append_csv(self, row: dict) -> None:
        # CSV needs one header: the first row fixes it, later rows with new keys go to JSONL only for those keys.
        if self._csv_fields is None:
            if os.path.exists(self.csv_path) and os.path.getsize(self.csv_path) > 0:
                with open(self.csv_path) as f:
                    self._csv_fields = next(csv.reader(f))
            else:
                self._csv_fields = ["kind", "step", "time", "loss", "lr", "images_per_s", "images_per_s_per_device",
                                    "epoch", "knn_top1", "probe_top1", "baseline_knn_top1", "baseline_probe_top1"]
                with open(self.csv_path, "w", newline="") as f:
                    csv.writer(f).writerow(self._csv_fields)
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self._csv_fields])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class PhaseTimer:
    """Wall time per named phase of the training step, accumulated between log steps.

    Disabled, ``phase()`` is a no-op context. Enabled on CUDA, each phase boundary synchronizes the device so that the
    time lands in the phase that spent it (asynchronous launches would otherwise bill everything to the first sync).
    """

    PHASES = ("data", "forward", "loss", "backward", "wait", "comm", "optimizer")

    def __init__(self, enabled: bool, device):
        self.enabled = enabled
        self._sync = device.type == "cuda"
        self.totals = dict.fromkeys(self.PHASES, 0.0)

    def _now(self) -> float:
        if self._sync:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        t0 = self._now()
        try:
            yield
        finally:
            self.totals[name] += self._now() - t0

    def pop_ms_per_step(self, steps: int) -> dict:
        """{'t_<phase>_ms': mean ms per optimizer step since the last call}; empty when disabled."""
        if not self.enabled or steps <= 0:
            return {}
        out = {f"t_{k}_ms": 1000.0 * v / steps for k, v in self.totals.items()}
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        return out


class Progress:
    """A tqdm bar on a terminal; plain periodic lines otherwise (logs of batch jobs stay readable)."""

    def __init__(self, total: int, enabled: bool, every_s: float = 15.0):
        self.enabled = enabled
        self.tty = sys.stdout.isatty()
        self.total, self.n = total, 0
        self.every_s, self._last = every_s, 0.0
        self._postfix = ""
        self._bar = None

    def start(self, initial: int) -> None:
        """Begin displaying at step ``initial`` (a resumed run starts part-way)."""
        self.n = initial
        if self.enabled and self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        if not self.enabled:
            return
        self.n += n
        if postfix is not None:
            self._postfix = postfix
        if self._bar is not None:
            self._bar.update(n)
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s or self.n >= self.total:
            self._last = now
            pct = 100.0 * self.n / max(self.total, 1)
            print(f"[{pct:5.1f}%] step {self.n}/{self.total} {self._postfix}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class LogWindow:
    """The steps since the last log line: their summed loss stays a device tensor until ``pop`` (a log step)."""

    def __init__(self, device, step: int = 0):
        import torch

        self.loss_sum = torch.zeros((), device=device)
        self.reset(step)

    def reset(self, step: int) -> None:
        self.loss_sum.zero_()
        self.steps, self.first_step, self.t0 = 0, step, time.monotonic()

    def add(self, loss) -> None:
        self.loss_sum += loss
        self.steps += 1

    def pop(self, step: int, images_per_step: int) -> tuple[float, float]:
        """(mean loss over the window and over every rank, images/s), then a new window from ``step``. Collective
        (every rank logs at the same steps); the host sync of a log step."""
        import torch.distributed as dist

        total = self.loss_sum
        if dist.is_initialized() and dist.get_world_size() > 1:
            total = total.clone()
            dist.all_reduce(total)
            total /= dist.get_world_size()
        mean = (total / max(self.steps, 1)).item()
        ips = (step - self.first_step) * images_per_step / max(time.monotonic() - self.t0, 1e-9)
        self.reset(step)
        return mean, ips
