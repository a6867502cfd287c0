"""Collectives that must carry gradients across ranks.

Every cross-rank operation whose result feeds the loss lives here and is tested on gloo against the single-process
result (tests/test_distributed.py): a collective without a backward silently drops the gradient of every other
rank's contribution, which trains but learns from a fraction of the negatives.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .runtime import collective_timeout


def resolve_group(group):
    """``None`` -> None (local only), ``"world"`` -> the default group, a ProcessGroup -> itself; checked."""
    if group is None:
        return None
    if isinstance(group, str):
        if group != "world":
            raise ValueError(f"group must be None, 'world' or a torch.distributed ProcessGroup, got the string {group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("group='world' needs an initialized default process group "
                             "(torch.distributed.init_process_group); pass group=None for local negatives")
        return dist.group.WORLD
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialized; call init_process_group first")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be None, 'world' or a torch.distributed ProcessGroup, got {type(group).__name__}")
    return group


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's ``x`` along dim 0 (rank order); backward sums the gradient over ranks.

    Rank q's output is consumed by rank q's loss L_q, so the gradient that reaches this rank's ``x`` must be
    Σ_q ∂L_q/∂x — the sum over ranks of the slice of each rank's incoming gradient that belongs to this rank.
    """

    @staticmethod
    def forward(ctx, x, group):
        world = dist.get_world_size(group)
        ctx.group, ctx.world, ctx.rank = group, world, dist.get_rank(group)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))  # (W·n, ...)
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        n = grad.shape[0] // ctx.world
        if dist.get_backend(ctx.group) == "nccl":
            # reduce-scatter moves half the bytes of an all-reduce and leaves exactly this rank's slice.
            mine = grad.new_empty((n,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return mine, None
        # gloo has no reduce-scatter: all-reduce a copy (the incoming gradient may be shared) and keep our slice.
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total[ctx.rank * n:(ctx.rank + 1) * n], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``x`` (same shape on every rank) concatenated along dim 0 in rank order, differentiably.

    ``group``: a ProcessGroup, ``"world"`` or None (the default group). Backward returns, on each rank, the sum over
    ranks of the gradient that reached this rank's slice. With each rank's loss a mean over its own samples and the
    data-parallel gradient *averaged* over ranks (DDP/DeepSpeed default), the update then equals the single-process
    one on the concatenated batch: this rank's ``x.grad`` is world_size × the single-process gradient of its slice,
    and the 1/world_size of the averaging cancels it.
    """
    if group is None:
        group = resolve_group("world")
    else:
        group = resolve_group(group)
    if dist.get_world_size(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


# ---------------------------------------------------------------------------------------------------------------- #
# Global BatchNorm: statistics over every rank of a group (SimCLR's "global BN", Chen et al. 2020, sec. 2)


def _bn_group(group_size: int):
    """The process group of this rank when ranks are split into consecutive groups of ``group_size``.

    Every rank must create every group, in the same order (a torch.distributed rule), so this is collective.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if group_size <= 0 or world % group_size:
        raise ValueError(f"bn_group_size {group_size} must divide the world size {world}")
    if group_size == world:
        return dist.group.WORLD
    mine = None
    for start in range(0, world, group_size):
        # The run's collective timeout: a new group would otherwise get the backend's default (30 min on gloo).
        g = dist.new_group(list(range(start, start + group_size)), timeout=collective_timeout())
        if start <= rank < start + group_size:
            mine = g
    return mine


class _GlobalBNFunction(torch.autograd.Function):
    """Training-mode batch norm whose mean/variance and input gradient use sums over the group's ranks.

    Statistics are fp32 whatever the input dtype. Forward gathers every rank's (count, mean, variance) per channel in
    one collective and merges them with Chan et al.'s parallel formula in fp64 — the E[x²] − E[x]² shortcut loses digits
    to cancellation when |mean| ≫ std. Backward all-reduces (Σdy, Σdy·x̂), because every input influenced the shared
    statistics. Weight/bias gradients stay local: the data-parallel gradient averaging combines them like every other
    parameter gradient.

    The elementwise work runs in ATen's fused batch-norm kernels (a CPU build has no SyncBatchNorm primitives):
    normalization is inference-mode ``batch_norm`` with the global statistics; backward takes dy·w·invstd, Σdy and
    Σdy·x̂ from one inference-mode ``native_batch_norm_backward`` pass, and the statistics' share of the input gradient,
    −w·invstd·(mean(dy) + x̂·mean(dy·x̂)), is a per-channel affine map of x: one more inference-mode ``batch_norm``.
    Against a float64 reference on (64, 8, 16, 16) inputs: outputs and input gradients within 1.1e-7 of the largest
    value, parameter gradients 1.5e-6 (ATen's own batch norm: 1.3e-6 for all four, its CPU variance being 6e-5 off on
    large maps where ``var_mean`` is 5e-8). Measured against the same arithmetic written as Python elementwise ops:
    a full-width ResNet-18 bf16 step (one process, 2 threads) 4.3 → 2.6 s, the default recipe on 2 gloo ranks 234 →
    309 images/s (``python -m benchmarks --quick --only breakdown``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        dims = [0] + list(range(2, x.dim()))  # every dim but channels
        c = x.shape[1]
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var_l, mean_l = torch.var_mean(xs, dim=dims, unbiased=False)  # (C,), (C,)
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        n_l = torch.full((1,), float(x.numel() // c), device=x.device)
        mine = torch.cat([n_l, mean_l.float(), var_l.float()])  # (2C+1,)
        if world > 1:
            every = mine.new_empty(world * mine.numel())  # one collective per layer (gloo wants a flat output)
            dist.all_gather_into_tensor(every, mine, group=group)
            every = every.view(world, -1).double()  # (W, 2C+1)
        else:
            every = mine.double()[None]
        counts, means, variances = every[:, :1], every[:, 1:c + 1], every[:, c + 1:]
        n = counts.sum()  # a device tensor: the count never visits the host
        mean64 = (counts * means).sum(0) / n
        var64 = (counts * (variances + (means - mean64) ** 2)).sum(0) / n  # biased, as used for normalization
        mean, var = mean64.float(), var64.float()
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_(var * (n / (n - 1).clamp_min(1)).float(), alpha=momentum)
        n = n.float()
        w = weight if weight is not None else torch.ones(c, device=x.device)
        b = bias if bias is not None else torch.zeros(c, device=x.device)
        y = torch.batch_norm(x, w, b, mean, var, False, 0.0, eps, False)  # inference mode: the given statistics
        ctx.save_for_backward(x, w, mean, var)
        ctx.eps, ctx.group, ctx.n, ctx.world, ctx.affine = eps, group, n, world, weight is not None
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, var = ctx.saved_tensors
        c = x.shape[1]
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        invstd = torch.rsqrt(var + ctx.eps)
        # train=False: grad_input = dy·w·invstd, grad_weight = Σdy·x̂, grad_bias = Σdy, all with the given statistics.
        # The statistics go in twice, as (mean, var) in the running slots and as (mean, invstd) in the saved slots:
        # ATen's CUDA kernel for contiguous NCHW reads the running pair in eval mode, while its path for
        # channels_last 4-D and for 2-D inputs reads the saved pair and asserts "save_mean should always be defined"
        # (aten/src/ATen/native/cuda/Normalization.cu, batch_norm_backward_cuda). The CPU kernel reads the running
        # pair on every path; tests/test_distributed_bn.py checks that the two pairs describe the same statistics.
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous(memory_format=layout), x, w, mean, var, mean, invstd, False, ctx.eps, [True, True, True])
        both = torch.cat([db.float(), dw.float()])
        if ctx.world > 1:
            dist.all_reduce(both, group=ctx.group)
        g_dy, g_dy_xhat = both[:c] / ctx.n, both[c:] / ctx.n
        scale = -w.float() * invstd * invstd * g_dy_xhat  # coefficient of x in the statistics' share
        shift = -w.float() * invstd * g_dy - scale * mean
        unit = torch.ones_like(var) - ctx.eps  # batch_norm(x, mean 0, var 1 − eps) = x·scale + shift
        dx = dx + torch.batch_norm(x, scale, shift, torch.zeros_like(mean), unit, False, 0.0, ctx.eps, False)
        dx = dx if dx.dtype == x.dtype else dx.to(x.dtype)
        if not ctx.affine:
            return dx, None, None, None, None, None, None, None
        return dx, dw.to(w.dtype), db.to(w.dtype), None, None, None, None, None


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the whole group's batch, for any input rank ≥ 2 (2-d heads and 4-d conv maps alike), on NCCL
    and gloo alike.

    Not ``torch.nn.SyncBatchNorm``: that refuses CPU tensors, and on CUDA its autograd function indexes with a
    boolean mask in every forward (a host sync per BN layer, ~55 in a ResNet-50 forward, torch 2.13). This layer's
    forward and backward read nothing on the host: one all-gather of (count, mean, var) forward, one all-reduce of
    (Σdy, Σdy·x̂) backward, the elementwise work in ATen's fused batch-norm kernels (cuDNN/CUDA ones on a GPU).
    """

    def __init__(self, num_features, group=None, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x):
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)  # running statistics: nothing to share
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return _GlobalBNFunction.apply(x, self.weight, self.bias, self.running_mean if self.track_running_stats else None,
                                       self.running_var if self.track_running_stats else None, self.eps,
                                       self.momentum, self.group)


def global_bn_layer(group_size: int):
    """A ``norm_layer(num_features)`` factory for the model: BN statistics over groups of ``group_size`` ranks."""
    group = _bn_group(group_size)

    def make(num_features: int):
        return GlobalBatchNorm(num_features, group=group)

    return make
