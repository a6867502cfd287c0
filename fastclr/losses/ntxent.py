"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, "A Simple Framework for
Contrastive Learning of Visual Representations", eq. 1), behind one function with three implementations:

- ``naive``: materializes the (M × 2N) similarity matrix; plain autograd. The reference.
- ``tiled``: blockwise online log-sum-exp, recompute in backward, O(N·d) memory (fastclr/losses/tiled.py).
- ``triton``: the same algorithm as GPU kernels (kernels/ntxent.py). ``auto`` picks it for CUDA tensors.
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import LossImpl, choices
from ..distributed import all_gather_with_grad, resolve_group
from .tiled import anchor_columns, ntxent_tiled

IMPLS = choices(LossImpl)

# The norm clamp of F.normalize: a zero embedding becomes the zero vector (all its similarities 0) instead of NaN.
_NORM_EPS = 1e-12


def ntxent_naive(rows: torch.Tensor, cols: torch.Tensor, row_offset: int, n_global: int,
                 temperature: float) -> torch.Tensor:
    """Reference: the whole (M, 2N) logit matrix and plain autograd (anchor layout: losses/tiled.py).

    Written as softplus(lse_neg − s_pos) with lse_neg the log-sum-exp over the negatives only — the same value as
    lse_all − s_pos, but its gradient is exact where p_pos → 1: the positive's (p_pos − 1) comes out as
    −sigmoid(lse_neg − s_pos) instead of a difference of two numbers near 1 (at τ = 0.05 that difference alone costs
    fp32 ~4e-5 of relative gradient accuracy).
    """
    m = rows.shape[0]
    if cols.shape[0] == 2:  # one sample: no negatives, the loss is 0 by definition (and so is its gradient)
        return (rows.sum() + cols.sum()) * 0.0
    self_col, pos_col = anchor_columns(m, row_offset, n_global, rows.device)
    anchors = torch.arange(m, device=rows.device)
    logits = rows @ cols.t() / temperature  # (M, 2N)
    pos = logits[anchors, pos_col]  # (M,)
    not_negative = torch.zeros_like(logits, dtype=torch.bool)
    not_negative[anchors, self_col] = True
    not_negative[anchors, pos_col] = True
    lse_neg = torch.logsumexp(logits.masked_fill(not_negative, float("-inf")), dim=1)  # (M,)
    return F.softplus(lse_neg - pos).mean()


def _ntxent_triton(rows, cols, row_offset, n_global, temperature):
    try:
        from fastclr_kernels import ntxent as _kernel
    except ImportError:  # running from a source tree without install
        from kernels import ntxent as _kernel
    return _kernel.ntxent(rows, cols, row_offset, n_global, temperature)


def _triton_max_d() -> int:
    try:
        from fastclr_kernels import ntxent as _kernel
    except ImportError:
        from kernels import ntxent as _kernel
    return _kernel.MAX_D


def _check_inputs(z_a, z_b, temperature, impl):
    for name, z in (("z_a", z_a), ("z_b", z_b)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (N, d), got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (fp32, bf16, fp16), got {z.dtype}")
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must have the same shape (N, d), got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if z_a.shape[0] == 0 or z_a.shape[1] == 0:
        raise ValueError(f"z_a and z_b must be non-empty (N ≥ 1 samples, d ≥ 1), got shape {tuple(z_a.shape)}")
    if z_a.dtype != z_b.dtype:
        raise TypeError(f"z_a and z_b must have the same dtype, got {z_a.dtype} and {z_b.dtype}")
    if z_a.device != z_b.device:
        raise ValueError(f"z_a and z_b must be on the same device, got {z_a.device} and {z_b.device}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a positive finite scalar, got a tensor of shape {tuple(temperature.shape)}")
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive finite number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number (SimCLR uses 0.1–0.5), got {temperature}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return float(temperature)


def _resolve_impl(impl: str, z: torch.Tensor) -> str:
    if impl == "auto":
        if z.is_cuda and z.shape[1] <= _triton_max_d_or_zero():
            return "triton"
        return "tiled"
    if impl == "triton":
        if not z.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU "
                             f"interpreter), got tensors on {z.device}; use impl='auto' or 'tiled'")
        max_d = _triton_max_d()
        if z.shape[1] > max_d:
            raise ValueError(f"impl='triton' supports embedding width d ≤ {max_d}, got z_a of width {z.shape[1]}; "
                             "use impl='tiled'")
    return impl


def _triton_max_d_or_zero() -> int:
    """The kernel's widest d, or 0 when Triton cannot be imported (``auto`` then falls back to ``tiled``)."""
    try:
        return _triton_max_d()
    except ImportError:
        return 0


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1, impl: str = "auto",
            group=None) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two views ``z_a``, ``z_b`` (N, d): row i of each is a view of sample i. fp32 scalar.

    Rows are L2-normalized, every one of the 2N embeddings is an anchor whose positive is the other view of its
    sample and whose negatives are the other 2N − 2 embeddings; the result is the mean over anchors of
    −log softmax_{j≠i}(z_i·z_j/τ)[positive]. Arithmetic is fp32 whatever the input dtype (the triton impl feeds bf16
    and fp16 inputs to the tensor cores as such and accumulates in fp32).

    ``impl``: "naive" | "tiled" | "triton" | "auto" (triton for CUDA tensors when d ≤ the kernel's limit, else tiled).

    ``group``: None for in-batch negatives only; "world" or a ProcessGroup for global negatives. Then every rank
    scores its own 2n anchors against the 2N = 2·n·world embeddings of all ranks, gathered with gradient, and the
    loss equals the single-process loss over the concatenated batch [z_a of rank 0; z_a of rank 1; …] (same for
    z_b), which requires the same N on every rank. Each rank returns the mean over its own anchors, so the mean of
    the ranks' losses is the global loss; each rank's input gradient is world_size × its slice of the global
    gradient, which the 1/world_size of data-parallel gradient averaging (DDP, DeepSpeed) turns into exactly the
    single-process update.
    """
    temperature = _check_inputs(z_a, z_b, temperature, impl)
    impl = _resolve_impl(impl, z_a)
    group = resolve_group(group)
    n, d = z_a.shape
    # Normalize in fp32: a bf16 sum of squares over d terms would lose the precision the loss is graded on.
    rows = F.normalize(torch.cat([z_a, z_b]).float(), dim=1, eps=_NORM_EPS)  # (2n, d)
    if impl == "triton" and z_a.dtype in (torch.bfloat16, torch.float16):
        rows = rows.to(z_a.dtype)  # tensor-core operands; halves the bytes gathered below too
    cols, row_offset, n_global = rows, 0, n
    if group is not None and dist.get_world_size(group) > 1:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        gathered = all_gather_with_grad(rows, group)  # (W·2n, d): [rank 0: a, b | rank 1: a, b | ...]
        cols = gathered.view(world, 2, n, d).transpose(0, 1).reshape(2 * world * n, d)  # [all a; all b]
        row_offset, n_global = rank * n, world * n
    if impl == "naive":
        return ntxent_naive(rows, cols, row_offset, n_global, temperature)
    if impl == "tiled":
        return ntxent_tiled(rows, cols, row_offset, n_global, temperature)
    return _ntxent_triton(rows, cols, row_offset, n_global, temperature)
