"""Steps whose gradients hold inf/NaN: skipped and counted; too many in a row stop the run.

After the gradient all-reduce every rank holds the same gradients, so every rank decides the same. A skipped step
drops the gradients, and LARS (which passes over parameters without a gradient) leaves parameters and momentum as
they were. fp16 is left to the loss scaler, which skips overflowing steps itself and halves its scale; its skips
are counted from the scale.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class NonfiniteGuard:
    def __init__(self, max_in_row: int, checkpoint_dir: str):
        self.max_in_row, self.checkpoint_dir = max_in_row, checkpoint_dir
        self.in_row = 0

    def skip(self, params: list[torch.nn.Parameter], step: int, skipped_so_far: int) -> bool:
        """True (gradients dropped) if any gradient is non-finite. One host sync, as a loss scaler has."""
        grads = [p.grad for p in params if p.grad is not None]
        if bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            self.in_row = 0
            return False
        for p in params:
            p.grad = None
        self.in_row += 1
        log.info(f"step {step + 1}: non-finite gradients, step skipped ({self.in_row} in a row, "
                 f"{skipped_so_far + 1} in all)")
        if self.in_row >= self.max_in_row:
            raise FloatingPointError(
                f"{self.in_row} steps in a row had non-finite gradients (train.max_nonfinite_steps={self.max_in_row}); "
                f"stopping without saving. The last complete checkpoint in {self.checkpoint_dir} is intact: lower "
                "optim.base_lr or check the data, then resume.")
        return True
