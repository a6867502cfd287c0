"""LARS: SGD with momentum whose step is rescaled per tensor by a trust ratio (You, Gitman & Ginsburg 2017).

Update, per tensor w of a group with ``lars=True`` (google-research/simclr ``lars_optimizer.py``, classic momentum):

    g' = g + wd·w
    trust = η·‖w‖ / (‖g'‖ + eps)   if ‖w‖ > 0 and ‖g'‖ > 0, else 1
    v ← m·v + lr·trust·g'
    w ← w − v

Groups with ``lars=False`` (BN parameters and biases, see ``param_groups``) take plain momentum SGD: no weight decay,
trust 1, as in SimCLR (Chen et al. 2020). ``eps=0`` is the published rule exactly; the default 1e-9 only matters
when ‖g'‖ is itself that small, where it bounds the ratio.

Both paths form g' in place in ``.grad`` (see ``LARS``) and allocate nothing of parameter size: fresh temporaries
for 28M parameters cost more on CPU (page faults, cache misses) than the multi-tensor path saves in dispatches.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .skipping import DeviceSkipOptimizer

CPU_CHUNK_BYTES = 16 << 20
"""Parameter bytes per multi-tensor call on CPU, where ATen's foreach operators are loops over the per-tensor kernels:
sweeping one operator over all 112 MB of ResNet-50's weights before the next evicts what the next one reads, so the
list is walked in chunks. ResNet-50 + head, fp32, 2-core Xeon, same tensors, interleaved steps: one sweep 48.6 ms,
16 MiB chunks 47.1, 4 MiB 46.0, the per-tensor loop 44.5. 4 MiB would take ~150 calls a step, 16 MiB takes ~70."""


def _trust(w_norm: Tensor, g_norm: Tensor, eta: float, eps: float) -> Tensor:
    """η‖w‖/(‖g'‖+eps) where both norms are positive, else 1 — chosen on the device, never on the host."""
    return torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / (g_norm + eps), 1.0)


def _chunks(params: list[Tensor], budget: int | None) -> list[slice]:
    """Consecutive runs of ``params`` of at most ``budget`` bytes each (a larger tensor alone); all of it if None."""
    if budget is None:
        return [slice(0, len(params))]
    runs, start, size = [], 0, 0
    for i, p in enumerate(params):
        nbytes = p.numel() * p.element_size()
        if i > start and size + nbytes > budget:
            runs.append(slice(start, i))
            start, size = i, 0
        size += nbytes
    return runs + [slice(start, len(params))]


def _norms_foreach(params: list[Tensor], grads: list[Tensor], *, weight_decay: float,
                   lars: bool) -> tuple[Tensor | None, Tensor]:
    """Phase 1 for one (device, dtype) bucket: g ← g' = g + wd·w in place where LARS applies, then the per-tensor
    norms (‖w‖ or None, ‖g'‖), each (P,): multi-tensor calls over chunks (one chunk on CUDA)."""
    chunks = _chunks(params, CPU_CHUNK_BYTES if params[0].is_cpu else None)
    w_norms, g_norms = [], []  # one 0-d tensor per parameter
    for c in chunks:
        if lars and weight_decay:
            torch._foreach_add_(grads[c], params[c], alpha=weight_decay)
        if lars:
            w_norms += torch._foreach_norm(params[c])
        g_norms += torch._foreach_norm(grads[c])
    return (torch.stack(w_norms) if lars else None), torch.stack(g_norms)


def _apply_foreach(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], scales: list[Tensor] | None, *,
                   lr: float, momentum: Tensor, keep: Tensor) -> None:
    """Phase 2: v ← m·v + lr·trust·g' (``scales``: lr·trust·keep per tensor, None outside LARS), w ← w − keep·v.
    ``keep`` is 1, or 0 for a skipped step (then ``momentum`` is 1 and the gradients are 0: v and w stay)."""
    chunks = _chunks(params, CPU_CHUNK_BYTES if params[0].is_cpu else None)
    neg_keep = [-keep] * len(params)
    for c in chunks:
        torch._foreach_mul_(bufs[c], momentum)
        if scales is not None:
            # On CUDA ATen runs this one call as a kernel per tensor (its multi-tensor kernels take per-tensor factors
            # only as host scalars, which would need a sync); every other call here is a multi-tensor kernel.
            torch._foreach_addcmul_(bufs[c], grads[c], scales[c])
        else:
            torch._foreach_mul_(grads[c], keep)
            torch._foreach_add_(bufs[c], grads[c], alpha=lr)
        torch._foreach_addcmul_(params[c], bufs[c], neg_keep[c])  # w − 1·v is exactly w − v


def _norms_loop(params: list[Tensor], grads: list[Tensor], *, weight_decay: float,
                lars: bool) -> tuple[Tensor | None, Tensor]:
    """The same operators one tensor at a time: the baseline the multi-tensor calls replace."""
    if lars and weight_decay:
        for p, g in zip(params, grads):
            g.add_(p, alpha=weight_decay)
    w = torch.stack([torch.linalg.vector_norm(p) for p in params]) if lars else None
    return w, torch.stack([torch.linalg.vector_norm(g) for g in grads])


def _apply_loop(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], scales: list[Tensor] | None, *,
                lr: float, momentum: Tensor, keep: Tensor) -> None:
    for i, (p, g, buf) in enumerate(zip(params, grads, bufs)):
        buf.mul_(momentum)
        if scales is not None:
            buf.addcmul_(g, scales[i])
        else:
            buf.add_(g.mul_(keep), alpha=lr)
        p.addcmul_(buf, -keep)


class LARS(DeviceSkipOptimizer):
    """LARS with per-group ``lars: bool`` (default True). ``foreach=False`` runs the per-tensor loop instead: the same
    kernels with ~17x more operator calls (ResNet-50), each a kernel launch on a GPU. On CPU, where those calls are
    cheap next to the memory traffic, the loop keeps each tensor in cache across its operators and runs ~5% faster
    (see ``CPU_CHUNK_BYTES``).

    Works on fp32 (master) parameters; ``step`` never reads a tensor value on the host, so it does not synchronize
    with the device. ``step`` overwrites the ``.grad`` of every parameter in a group with ``lars=True`` and
    ``weight_decay > 0`` with g' = g + wd·w: gradients are consumed by the step (the training engine clears them
    right after it), and reading them afterwards gives g', not g.
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

    def _update(self, work: list, all_grads: list[Tensor]) -> None:
        norms = []
        for group, params, grads, _ in work:
            norm = _norms_foreach if group["foreach"] else _norms_loop
            norms.append(norm(params, grads, weight_decay=group["weight_decay"], lars=group["lars"]))
        # One verdict for the whole step, on the device: every gradient finite (and no fp16 overflow).
        finite, keep = self._verdict(torch.cat([g for _, g in norms]), all_grads)
        momenta = {}  # m for an applied step, 1 for a skipped one, in the parameters' dtype (exactly m when kept)
        for (group, params, grads, bufs), (w_norm, g_norm) in zip(work, norms):
            lr, m = group["lr"], group["momentum"]
            if m not in momenta:
                momenta[m] = torch.where(finite, keep.new_full((), m), 1.0)
            scales = None
            if group["lars"]:
                # lr·trust·keep per tensor, (P,), handed out as 0-d tensor views: no value reaches the host.
                scales = (lr * _trust(w_norm, g_norm, group["trust_coefficient"], group["eps"]) * keep).unbind(0)
            apply = _apply_foreach if group["foreach"] else _apply_loop
            apply(params, grads, bufs, scales, lr=lr, momentum=momenta[m], keep=keep)
