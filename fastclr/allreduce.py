"""The data-parallel gradient all-reduce, overlapped with the backward pass.

The gradients live as views into a few flat buckets (the scheme of PyTorch DDP: Li et al., "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training", VLDB 2020): autograd accumulates straight into them, and during
the last micro-batch's backward each bucket's all-reduce starts as soon as its last gradient is ready, while the
backward of the layers below still runs. ``finish()`` waits for what is left — the exposed communication — and
averages. Buckets are filled in reverse registration order, which is the order a ResNet's backward produces
gradients, so the first bucket fills first.

The flat buckets also serve the optimizer: a handful of tensors to scan for inf/NaN and to sanitize, instead of one
kernel per parameter (see :class:`fastclr.optim.LARS`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter]):
        p0 = params[0]
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=p0.dtype, device=p0.device)
        self.views, offset = [], 0
        for p in params:
            # The parameter's own strides (channels_last weights included), so that autograd's in-place
            # accumulation keeps the layout it expects.
            self.views.append(self.flat.narrow(0, offset, p.numel()).as_strided(p.shape, p.stride()))
            offset += p.numel()
        self.pending = len(params)
        self.work = None


class GradientBuckets:
    """``prepare()`` before a step's first backward, ``arm()`` before its last, ``finish()`` after it.

    ``overlap=False`` defers every all-reduce to ``finish()`` (the step breakdown's un-overlapped reference).
    ``bucket_mb``: bucket size; DDP's default is 25 MB. Smaller buckets start communicating earlier and pay the
    collective's latency more often. ``first_bucket_mb`` caps the first bucket (the last layers, whose gradients
    backward produces first), as DDP does with 1 MB: its all-reduce starts early even in a model that fits one
    ``bucket_mb`` bucket whole, which could otherwise not overlap at all.
    """

    def __init__(self, params, world_size: int, bucket_mb: float = 25.0, overlap: bool = True, group=None,
                 first_bucket_mb: float = 1.0):
        params = [p for p in params if p.requires_grad]
        self.world_size, self.overlap, self.group = world_size, overlap, group
        self.buckets: list[_Bucket] = []
        current, size = [], 0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            limit = (min(first_bucket_mb, bucket_mb) if not self.buckets else bucket_mb) * 2**20
            if current and (size + nbytes > limit or (p.dtype, p.device) != (current[0].dtype, current[0].device)):
                self.buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self.buckets.append(_Bucket(current))
        self._where = {}
        for b in self.buckets:
            for p, view in zip(b.params, b.views):
                self._where[p] = (b, view)
                p.register_post_accumulate_grad_hook(self._ready)
        self.armed = False

    @property
    def flat(self) -> list[torch.Tensor]:
        return [b.flat for b in self.buckets]

    def prepare(self) -> None:
        """Zeroed buckets, each parameter's ``.grad`` a view into its bucket (the engine drops ``.grad`` after a
        step)."""
        for b in self.buckets:
            b.flat.zero_()
            for p, view in zip(b.params, b.views):
                p.grad = view
            b.pending, b.work = len(b.params), None
        self.armed = False

    def arm(self) -> None:
        """The next backward is the step's last: all-reduce each bucket once its gradients are complete."""
        self.armed = self.overlap and self.world_size > 1

    def _ready(self, p: torch.nn.Parameter) -> None:
        bucket, view = self._where[p]
        if p.grad is not view:  # someone replaced the gradient tensor: fold it back into the bucket
            view.copy_(p.grad)
            p.grad = view
        if not self.armed:
            return
        bucket.pending -= 1
        if bucket.pending == 0:
            bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket's all-reduce (starting those backward did not: no overlap, or parameters that got
        no gradient this step) and average over the ranks, as DeepSpeed does (sum, then × 1/world)."""
        self.armed = False
        if self.world_size == 1:
            return
        for b in self.buckets:
            if b.work is None:
                b.work = dist.all_reduce(b.flat, group=self.group, async_op=True)
        for b in self.buckets:
            b.work.wait()
            b.flat.mul_(1.0 / self.world_size)
            b.work = None
