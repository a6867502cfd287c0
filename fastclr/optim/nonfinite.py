"""Steps whose gradients hold inf/NaN: skipped on the device, counted on the device, judged at log steps.

The optimizer decides each step without the host (``LARS.step_ok``: every gradient finite, no fp16 overflow; a
skipped step leaves parameters and momentum as they were). After the all-reduce every rank holds the same gradients,
so every rank decides the same. This module keeps the tallies as device tensors and reads them only where the loop
syncs anyway — log steps and checkpoints: too many skipped steps in a row then stop the run, and no checkpoint is
written in the middle of a streak (the batch that overflowed also went through BN's running statistics).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class SkippedSteps:
    def __init__(self, device, max_in_row: int, checkpoint_dir: str):
        self.max_in_row, self.checkpoint_dir = max_in_row, checkpoint_dir
        self.total, self.streak, self.worst = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(3))
        self._seen = 0

    def reset(self, total: int) -> None:
        """Continue a resumed run's count (a checkpoint is never taken inside a streak)."""
        self.total.fill_(total)
        self.streak.zero_()
        self.worst.zero_()
        self._seen = total

    def update(self, ok: torch.Tensor) -> None:
        """After each step, on the device: ``ok`` is the optimizer's verdict (0-d bool)."""
        bad = (~ok).to(torch.int64)
        self.total += bad
        self.streak.add_(1).mul_(bad)  # +1 on a skipped step, back to 0 on an applied one
        torch.maximum(self.worst, self.streak, out=self.worst)

    def check(self, step: int) -> tuple[int, int]:
        """(skipped in all, skipped in a row now), read on the host; stops the run after too many in a row."""
        total, streak, worst = (int(t) for t in torch.stack([self.total, self.streak, self.worst]).tolist())
        if total > self._seen:
            log.info(f"step {step}: {total - self._seen} step(s) skipped for non-finite gradients since the last log "
                     f"({streak} in a row now, {total} in all)")
        self._seen = total
        self.worst.copy_(self.streak)
        if worst >= self.max_in_row:
            raise FloatingPointError(
                f"{worst} steps in a row had non-finite gradients (train.max_nonfinite_steps={self.max_in_row}); "
                f"stopping without saving. The last complete checkpoint in {self.checkpoint_dir} is intact: lower "
                "optim.base_lr or check the data, then resume.")
        return total, streak
