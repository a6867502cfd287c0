"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, "A Simple Framework for
Contrastive Learning of Visual Representations", eq. 1), behind one function with three implementations:

- ``naive``: materializes the (M × 2N) similarity matrix; plain autograd. The reference.
- ``tiled``: blockwise online log-sum-exp, recompute in backward, O(N·d) memory (fastclr/losses/tiled.py).
- ``triton``: the same algorithm as GPU kernels (kernels/ntxent.py). ``auto`` picks it for CUDA tensors.

Each takes an optional queue of extra negatives, SimCLR v2's momentum-encoder memory (Chen et al. 2020b, "Big
Self-Supervised Models are Strong Semi-Supervised Learners", sec. 2, after MoCo, He et al. 2020): columns scored by
every anchor, never materialized as a matrix by tiled and triton, and given no gradient.
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
                 temperature: float, queue: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the whole (M, 2N + Q) logit matrix and plain autograd (anchor layout: losses/tiled.py); ``queue``
    (Q, d) or None holds extra negatives of every anchor.

    Written as softplus(lse_neg − s_pos) with lse_neg the log-sum-exp over the negatives only — the same value as
    lse_all − s_pos, but its gradient is exact where p_pos → 1: the positive's (p_pos − 1) comes out as
    −sigmoid(lse_neg − s_pos) instead of a difference of two numbers near 1 (at τ = 0.05 that difference alone costs
    fp32 ~4e-5 of relative gradient accuracy).
    """
    m = rows.shape[0]
    has_queue = queue is not None and queue.shape[0] > 0
    if cols.shape[0] == 2 and not has_queue:  # one sample: no negatives, the loss is 0 by definition (so is its grad)
        return (rows.sum() + cols.sum()) * 0.0
    self_col, pos_col = anchor_columns(m, row_offset, n_global, rows.device)
    anchors = torch.arange(m, device=rows.device)
    logits = rows @ cols.t() / temperature  # (M, 2N)
    pos = logits[anchors, pos_col]  # (M,)
    not_negative = torch.zeros_like(logits, dtype=torch.bool)
    not_negative[anchors, self_col] = True
    not_negative[anchors, pos_col] = True
    negatives = logits.masked_fill(not_negative, float("-inf"))
    if has_queue:
        negatives = torch.cat([negatives, rows @ queue.t() / temperature], dim=1)  # (M, 2N + Q)
    lse_neg = torch.logsumexp(negatives, dim=1)  # (M,)
    return F.softplus(lse_neg - pos).mean()


def _kernel_module():
    try:
        from fastclr_kernels import ntxent as kernel
    except ImportError:  # running from a source tree without install
        from kernels import ntxent as kernel
    return kernel


def _ntxent_triton(rows, cols, row_offset, n_global, temperature, queue=None, dot_dtype=None):
    return _kernel_module().ntxent(rows, cols, row_offset, n_global, temperature, queue, dot_dtype)


def _triton_max_d(dtype: torch.dtype) -> int:
    """The kernels' widest d for embeddings of ``dtype`` (bf16/fp16 are multiplied in their own dtype, fp32 as
    tf32x3, which the kernels take only up to 128 wide)."""
    kernel = _kernel_module()
    return kernel.MAX_D[kernel.operand_bits(dtype)]


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


def _check_queue(queue, z_a) -> None:
    if queue is None:
        return
    if not isinstance(queue, torch.Tensor):
        raise TypeError(f"queue must be None or a torch.Tensor of shape (Q, d), got {type(queue).__name__}")
    if queue.dim() != 2 or queue.shape[1] != z_a.shape[1]:
        raise ValueError(f"queue must be (Q, d) with the embeddings' d = {z_a.shape[1]}, got shape "
                         f"{tuple(queue.shape)}")
    if not queue.is_floating_point():
        raise TypeError(f"queue must be a floating-point tensor, got {queue.dtype}")
    if queue.device != z_a.device:
        raise ValueError(f"queue must be on the embeddings' device {z_a.device}, got {queue.device}")
    if queue.requires_grad:
        raise ValueError("queue must not require grad: it holds constant negatives (momentum-encoder keys) and "
                         "gets no gradient; pass queue.detach()")


def _resolve_impl(impl: str, z: torch.Tensor) -> str:
    if impl == "auto":
        if z.is_cuda and z.shape[1] <= _triton_max_d_or_zero(z.dtype):
            return "triton"
        return "tiled"
    if impl == "triton":
        if not z.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU "
                             f"interpreter), got tensors on {z.device}; use impl='auto' or 'tiled'")
        max_d = _triton_max_d(z.dtype)
        if z.shape[1] > max_d:
            raise ValueError(f"impl='triton' supports embedding width d ≤ {max_d} for {z.dtype} embeddings (fp32 "
                             f"≤ 128, bf16/fp16 ≤ 256), got z_a of width {z.shape[1]}; use impl='tiled' or 'auto', or "
                             "bf16/fp16 embeddings")
    return impl


def _triton_max_d_or_zero(dtype: torch.dtype) -> int:
    """The kernel's widest d, or 0 when Triton cannot be imported (``auto`` then falls back to ``tiled``)."""
    try:
        return _triton_max_d(dtype)
    except ImportError:
        return 0


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1, impl: str = "auto",
            group=None, queue: torch.Tensor | None = None) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two views ``z_a``, ``z_b`` (N, d): row i of each is a view of sample i. fp32 scalar.

    Rows are L2-normalized, every one of the 2N embeddings is an anchor whose positive is the other view of its
    sample and whose negatives are the other 2N − 2 embeddings; the result is the mean over anchors of
    −log softmax_{j≠i}(z_i·z_j/τ)[positive]. Arithmetic is fp32 whatever the input dtype (for bf16 and fp16 inputs
    the triton impl multiplies the fp32-normalized embeddings in that dtype on the tensor cores, accumulating and
    returning gradients in fp32).

    ``impl``: "naive" | "tiled" | "triton" | "auto" (triton for CUDA tensors when d ≤ the kernel's limit — 256 for
    bf16/fp16 embeddings, 128 for fp32 — else tiled).

    ``group``: None for in-batch negatives only; "world" or a ProcessGroup for global negatives. Then every rank
    scores its own 2n anchors against the 2N = 2·n·world embeddings of all ranks, gathered with gradient, and the
    loss equals the single-process loss over the concatenated batch [z_a of rank 0; z_a of rank 1; …] (same for
    z_b), which requires the same N on every rank. Each rank returns the mean over its own anchors, so the mean of
    the ranks' losses is the global loss; each rank's input gradient is world_size × its slice of the global
    gradient, which the 1/world_size of data-parallel gradient averaging (DDP, DeepSpeed) turns into exactly the
    single-process update.

    ``queue``: None, or a (Q, d) tensor of extra negatives for every anchor (SimCLR v2's memory of momentum-encoder
    embeddings), already L2-normalized (it is used as given) and not requiring grad (it gets none); the same on
    every rank. Each anchor's softmax then runs over its 2N − 2 negatives, its positive and the Q queue columns.
    Q = 0 gives exactly the result without a queue.
    """
    temperature = _check_inputs(z_a, z_b, temperature, impl)
    _check_queue(queue, z_a)
    impl = _resolve_impl(impl, z_a)
    group = resolve_group(group)
    n, d = z_a.shape
    # Normalize in fp32: a bf16 sum of squares over d terms would lose the precision the loss is graded on.
    rows = F.normalize(torch.cat([z_a, z_b]).float(), dim=1, eps=_NORM_EPS)  # (2n, d)
    cols, row_offset, n_global = rows, 0, n
    if group is not None and dist.get_world_size(group) > 1:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        # Gathered in fp32 even when the kernel multiplies in bf16/fp16 (it casts after this, and returns fp32
        # gradients): the gather's backward then sums every rank's column gradient in fp32. Cast before the gather,
        # the gradients were rounded to bf16 and summed in bf16: 4.6–6.7× the input-gradient error on 4 ranks
        # (1.05e-2–1.7e-2 vs ≤ 3.0e-3 of the largest entry, against the fp64 reference of the kernel's operands, 6
        # seeds; tests/test_distributed.py). The extra bytes (2N·d·2, 2 MiB at 2N = 8192, d = 128) are small beside
        # the model's gradient all-reduce.
        gathered = all_gather_with_grad(rows, group)  # (W·2n, d): [rank 0: a, b | rank 1: a, b | ...]
        cols = gathered.view(world, 2, n, d).transpose(0, 1).reshape(2 * world * n, d)  # [all a; all b]
        row_offset, n_global = rank * n, world * n
    if impl == "naive":
        return ntxent_naive(rows, cols, row_offset, n_global, temperature, None if queue is None else queue.float())
    if impl == "tiled":
        return ntxent_tiled(rows, cols, row_offset, n_global, temperature,
                            queue=None if queue is None else queue.float())
    # bf16/fp16 inputs: the kernel casts its operands for the tensor cores and returns fp32 gradients.
    dot_dtype = z_a.dtype if z_a.dtype in (torch.bfloat16, torch.float16) else None
    return _ntxent_triton(rows, cols, row_offset, n_global, temperature, queue, dot_dtype)
