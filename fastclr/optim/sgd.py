"""Nesterov-momentum SGD that skips a non-finite step on the device, like :class:`fastclr.optim.LARS`.

The update is ``torch.optim.SGD(nesterov=True, dampening=0)``'s (the reference's ``--optimizer=momentum``)::

    g' = g + wd·w
    v ← m·v + g'
    w ← w − lr·(g' + m·v)

``torch.optim.SGD`` cannot leave a step out without reading a flag on the host; here the verdict (every gradient
finite, no fp16 overflow) is a device tensor ``step_ok``, and a skipped step multiplies its update by 0 and keeps
``v`` (momentum 1, gradient 0), so parameters and buffers stay exactly as they were.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .skipping import DeviceSkipOptimizer


class NesterovSGD(DeviceSkipOptimizer):
    """Per-group ``lr``, ``momentum``, ``weight_decay``; ``step_ok`` (0-d bool tensor) after each step."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if not lr >= 0 or not 0 <= momentum < 1 or not weight_decay >= 0:
            raise ValueError(f"NesterovSGD needs lr >= 0, momentum in [0, 1), weight_decay >= 0; got {lr}, "
                             f"{momentum}, {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _update(self, work: list, all_grads: list[Tensor]) -> None:
        finite, keep = self._verdict(torch.stack(torch._foreach_norm(all_grads)), all_grads)
        for group, params, grads, bufs in work:
            m, wd = group["momentum"], group["weight_decay"]
            if wd:
                torch._foreach_add_(grads, params, alpha=wd)
            torch._foreach_mul_(grads, keep)  # a skipped step: g' = 0
            torch._foreach_mul_(bufs, torch.where(finite, keep.new_full((), m), 1.0))
            torch._foreach_add_(bufs, grads)  # v ← m·v + g'
            torch._foreach_add_(grads, bufs, alpha=m)  # g' + m·v, in place (the step consumes the gradients)
            torch._foreach_mul_(grads, keep)  # a skipped step moves nothing
            torch._foreach_add_(params, grads, alpha=-group["lr"])
