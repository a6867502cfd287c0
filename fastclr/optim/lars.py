"""LARS: SGD with momentum whose step is rescaled per tensor by a trust ratio (You, Gitman & Ginsburg 2017).

Update, per tensor w of a group with ``lars=True`` (google-research/simclr ``lars_optimizer.py``, classic momentum):

    g' = g + wd·w
    trust = η·‖w‖ / (‖g'‖ + eps)   if ‖w‖ > 0 and ‖g'‖ > 0, else 1
    v ← m·v + lr·trust·g'
    w ← w − v

Groups with ``lars=False`` (BN parameters and biases, see ``param_groups``) take plain momentum SGD: no weight decay,
trust 1, as in SimCLR (Chen et al. 2020). ``eps=0`` is the published rule exactly; the default 1e-9 only matters
when ‖g'‖ is itself that small, where it bounds the ratio.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor


def _trust(w_norm: Tensor, g_norm: Tensor, eta: float, eps: float) -> Tensor:
    """η‖w‖/(‖g'‖+eps) where both norms are positive, else 1 — chosen on the device, never on the host."""
    return torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / (g_norm + eps), torch.ones_like(w_norm))


def _step_foreach(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float, momentum: float,
                  weight_decay: float, eta: float, eps: float, lars: bool) -> None:
    """All tensors of one (device, dtype) bucket at once: a fixed number of multi-tensor kernels."""
    if lars:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)  # g' (new tensors: .grad stays untouched)
        w_norm = torch.stack(torch._foreach_norm(params))  # (P,)
        g_norm = torch.stack(torch._foreach_norm(grads))  # (P,)
        scale = lr * _trust(w_norm, g_norm, eta, eps)  # (P,)
        torch._foreach_mul_(grads, scale.unbind(0))  # g' ← lr·trust·g' (a 0-d tensor per tensor: no host read)
    else:
        grads = torch._foreach_mul(grads, lr)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    torch._foreach_sub_(params, bufs)


def _step_loop(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float, momentum: float,
               weight_decay: float, eta: float, eps: float, lars: bool) -> None:
    """The same math one tensor at a time (several kernels per tensor): the baseline ``_step_foreach`` replaces."""
    for p, g, buf in zip(params, grads, bufs):
        if lars:
            g = torch.add(g, p, alpha=weight_decay)
            g = g * (lr * _trust(torch.linalg.vector_norm(p), torch.linalg.vector_norm(g), eta, eps))
        else:
            g = g * lr
        buf.mul_(momentum).add_(g)
        p.sub_(buf)


class LARS(torch.optim.Optimizer):
    """LARS with per-group ``lars: bool`` (default True). ``foreach=False`` runs the per-tensor loop instead.

    Works on fp32 (master) parameters; ``step`` never reads a tensor value on the host, so it does not synchronize
    with the device.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-9, foreach: bool = True):
        checks = (("lr", lr, lr >= 0, ">= 0"), ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
                  ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
                  ("trust_coefficient", trust_coefficient, trust_coefficient > 0, "> 0"),
                  ("eps", eps, eps >= 0, ">= 0"))
        for name, value, ok, want in checks:
            if not ok:
                raise ValueError(f"LARS {name} must be {want}, got {value}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, lars=True, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets = defaultdict(lambda: ([], [], []))  # (device, dtype) -> (params, grads, momentum buffers)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bucket = buckets[(p.device, p.dtype)]
                bucket[0].append(p)
                bucket[1].append(p.grad)
                bucket[2].append(state["momentum_buffer"])
            update = _step_foreach if group["foreach"] else _step_loop
            for params, grads, bufs in buckets.values():
                update(params, grads, bufs, lr=group["lr"], momentum=group["momentum"],
                       weight_decay=group["weight_decay"], eta=group["trust_coefficient"], eps=group["eps"],
                       lars=group["lars"])
        return loss
