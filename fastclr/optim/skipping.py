"""What the optimizers of :mod:`fastclr.optim` share: a step that decides on the device, never on the host, whether
to apply itself. Every gradient finite (and, under fp16, no overflow found by the loss scaler) → applied; otherwise
skipped with parameters and momentum left exactly as they were. The verdict is ``step_ok``, a 0-d bool tensor the
trainer counts without reading it (:class:`fastclr.optim.SkippedSteps`)."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor


def sanitize(tensors: list[Tensor]) -> None:
    """inf/NaN → 0 in place, so that a skipped step's arithmetic stays finite (0·NaN would be NaN)."""
    for t in tensors:
        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)


class DeviceSkipOptimizer(torch.optim.Optimizer):
    """``step`` collects each group's parameters with gradients in (device, dtype) buckets with their momentum
    buffers, unscales fp16 gradients on the device, and hands them to the subclass's ``_update(work, grads)``, which
    calls :meth:`_verdict` once with the gradients' norms."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self.grad_buffers: list[Tensor] = []
        """Flat tensors that hold every gradient (``fastclr.allreduce.GradientBuckets.flat``), if the gradients are
        views into them: sanitized in a few calls instead of one per tensor."""
        self.step_ok: Tensor | None = None

    _step_supports_amp_scaling = True
    """fp16: ``torch.amp.GradScaler.step`` hands over ``grad_scale`` and ``found_inf`` (as attributes) instead of
    reading ``found_inf`` on the host itself: the step unscales and skips on the device."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, params, grads, bufs) per (device, dtype) bucket of each group
        for group in self.param_groups:
            buckets = defaultdict(lambda: ([], [], []))  # (device, dtype) -> (params, grads, momentum buffers)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bucket = buckets[(p.device, p.dtype)]
                bucket[0].append(p)
                bucket[1].append(p.grad)
                bucket[2].append(state["momentum_buffer"])
            work += [(group, *b) for b in buckets.values()]
        if not work:
            return loss
        all_grads = [g for _, _, grads, _ in work for g in grads]
        scale = getattr(self, "grad_scale", None)
        if scale is not None:  # fp16: unscale on the device (GradScaler did not)
            torch._foreach_mul_(all_grads, scale.double().reciprocal().float())
        self._update(work, all_grads)
        return loss

    def _verdict(self, grad_norms: Tensor, all_grads: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(finite, keep) from the gradients' norms, on the device: ``keep`` is 1 for an applied step, 0 for a
        skipped one; then the gradients are sanitized so the skipped step's arithmetic stays finite."""
        finite = torch.isfinite(grad_norms).all()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            finite = finite & (found_inf == 0)
        self.step_ok = finite  # whether this step is applied, for the trainer's skip counters (read at log steps)
        keep = finite.to(all_grads[0].dtype)
        sanitize(self.grad_buffers or all_grads)
        return finite, keep
