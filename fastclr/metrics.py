"""Run metrics as files: CSV + JSONL rows and TensorBoard scalars, in the run's (or stage's) output folder.

Only rank 0 writes. Values arrive as Python floats: the trainer turns tensors into numbers at log steps only, since
every ``.item()`` is a host sync.
"""
from __future__ import annotations

import csv
import json
import logging
import os
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
