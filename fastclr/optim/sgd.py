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


class NesterovSGD(torch.optim.Optimizer):
    """Per-group ``lr``, ``momentum``, ``weight_decay``; ``step_ok`` (0-d bool tensor) after each step."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if not lr >= 0 or not 0 <= momentum < 1 or not weight_decay >= 0:
            raise ValueError(f"NesterovSGD needs lr >= 0, momentum in [0, 1), weight_decay >= 0; got {lr}, "
                             f"{momentum}, {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.grad_buffers: list[Tensor] = []
        """Flat tensors holding every gradient (``GradientBuckets.flat``), if the gradients are views into them."""
        self.step_ok: Tensor | None = None

    _step_supports_amp_scaling = True
    """fp16: ``GradScaler.step`` hands over ``grad_scale`` and ``found_inf``; the step unscales and skips itself."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if params:
                work.append((group, params, [p.grad for p in params],
                             [self.state[p]["momentum_buffer"] for p in params]))
        if not work:
            return loss
        all_grads = [g for _, _, grads, _ in work for g in grads]
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            torch._foreach_mul_(all_grads, scale.double().reciprocal().float())
        finite = torch.stack([torch.isfinite(n) for n in torch._foreach_norm(all_grads)]).all()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            finite = finite & (found_inf == 0)
        self.step_ok = finite
        keep = finite.to(all_grads[0].dtype)
        for g in self.grad_buffers or all_grads:  # inf/NaN → 0: a skipped step's arithmetic stays finite
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
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
        return loss
