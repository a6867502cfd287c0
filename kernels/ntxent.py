"""NT-Xent (SimCLR) forward and backward as Triton kernels: blockwise online log-sum-exp, recompute in backward.

Same algorithm and anchor layout as the PyTorch twin fastclr/losses/tiled.py, whose docstring derives the gradient.
``rows`` (M, d) are this rank's M = 2n normalized anchors ``[z_a[o:o+n]; z_b[o:o+n]]``, ``cols`` (2N, d) the
normalized embeddings of the whole batch ``[z_a; z_b]``; anchor i < n has its own column at o+i and its positive
at N+o+i, anchor n+i the reverse. Only two numbers per row are stored between forward and backward — the
log-sum-exp over the anchor's negatives and 1 − p_pos — so memory is O(N·d) and the similarity matrix is recomputed
tile by tile. Loss and gradient are formed as softplus / sigmoid of lse_neg − s_pos, which stay exact where the
positive dominates (p_pos → 1), instead of differences of nearly equal numbers.

An optional ``queue`` (Q, d) adds Q columns that are negatives of every anchor (SimCLR v2's momentum-encoder memory,
Chen et al. 2020b): the forward and the row gradient loop over them before the batch columns; the column gradient
is launched over the 2N batch columns only, so no gradient is ever formed for the queue. Q = 0 runs exactly the
loops without a queue.

Low-precision operands: the autograd function takes the fp32 normalized embeddings and a ``dot_dtype`` (bf16 or
fp16) to multiply them in; it casts them itself and returns fp32 gradients straight from the fp32 accumulators, so
a caller's cross-rank gather and its backward (a sum over ranks) stay fp32.

Backward is two kernels rather than one with atomics: ``_bwd_rows_kernel`` owns a block of anchors and sums
(P − Y)·cols over all columns, ``_bwd_cols_kernel`` owns a block of columns and sums (P − Y)ᵀ·rows over all anchors.
Each output tile is written by one program, so the gradient is deterministic and free of atomic contention on the
(2N, d) column gradient, for the price of recomputing the logits once more (5 tile GEMMs in all instead of 4).

Launch configurations: kernels/ntxent_configs.py. Without a GPU: ``TRITON_INTERPRET=1`` before import.
"""
import os
import time

import torch
import triton
import triton.language as tl

from .ntxent_configs import CONFIGS, MAX_D, operand_bits  # noqa: F401 - part of this module's interface

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634

# The smallest BLOCK_D launched on a GPU: every width d ≤ 64 runs the 64 entries (masked), so the table covers every
# BLOCK_D a launch can have. The interpreter keeps 16, as its programs run one after another on the CPU.
MIN_BLOCK_D = 16 if _INTERPRET else 64


def block_d(d: int) -> int:
    """The BLOCK_D a width-``d`` launch compiles with."""
    return max(MIN_BLOCK_D, triton.next_power_of_2(d))


def _cpu_bench(kernel_call, quantiles):
    """Autotuning timer for the interpreter, which has no device events: one timed run, every quantile the same."""
    start = time.perf_counter()
    kernel_call()
    return [(time.perf_counter() - start) * 1e3] * len(quantiles)


def _configs(kernel: str):
    """Every configuration of the kernel's table (the autotuner's list; ``_pruner`` keeps those of a launch)."""
    if _INTERPRET:
        # The interpreter runs programs one after another: small tiles, and two configs so autotuning is exercised.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}), triton.Config({"BLOCK_M": 64, "BLOCK_N": 32})]
    seen = dict.fromkeys(c for by_d in CONFIGS[kernel].values() for cs in by_d.values() for c in cs)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in seen]


def _pruner(kernel: str):
    """The autotuner's early prune: only the table's entries for this launch's operand bits and BLOCK_D."""
    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        bits = operand_bits(named_args["R"].dtype)
        keep = set(CONFIGS[kernel][bits][kwargs["BLOCK_D"]])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]
    return {"early_config_prune": prune}


_BENCH = _cpu_bench if _INTERPRET else None


@triton.jit
def _anchor_columns(offs_m, HALF, ROW_OFFSET, N_GLOBAL):
    """Own and positive column of each anchor in ``offs_m`` (layout in the module docstring)."""
    is_b = offs_m >= HALF
    sample = ROW_OFFSET + tl.where(is_b, offs_m - HALF, offs_m)
    own = tl.where(is_b, N_GLOBAL + sample, sample)
    pos = tl.where(is_b, sample, N_GLOBAL + sample)
    return own, pos


@triton.jit
def _load_rows(X, offs, n, stride, offs_d, D, UPCAST: tl.constexpr):
    """Rows ``offs`` of the (n, D) matrix X as a (len(offs), BLOCK_D) tile, zeros outside."""
    # int64 row offsets: 2N·stride passes 2^31 at a few million embeddings of width 256.
    x = tl.load(X + offs.to(tl.int64)[:, None] * stride + offs_d[None, :],
                mask=(offs < n)[:, None] & (offs_d < D)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.autotune(configs=_configs("fwd"), key=["M", "K", "NQ_TUNE", "D"], prune_configs_by=_pruner("fwd"),
                 do_bench=_BENCH)
@triton.jit
def _fwd_kernel(
    R,  # (M, D) normalized anchors of this rank
    C,  # (K, D) normalized columns of the whole batch: every first view, then every second view
    Q,  # (NQ, D) normalized extra negatives of every anchor (the queue); unread when NQ = 0
    LOSS,  # (M,) fp32 out: lse_i − s_i,pos(i) = softplus(lse_neg_i − s_i,pos(i)), natural log
    LSE,  # (M,) fp32 out: log-sum-exp of anchor i's base-2 logits over its negatives only, base 2
    W,  # (M,) fp32 out: 1 − p_pos = sigmoid(lse_neg − s_pos), the weight of the negatives in the backward
    stride_r,  # elements between rows of R
    stride_c,  # elements between rows of C
    stride_q,  # elements between rows of Q
    M,  # anchors on this rank, 2n
    K,  # batch columns, 2N
    NQ,  # queue columns, Q ≥ 0
    NQ_TUNE,  # autotune key only: Q rounded up to a power of two, so a filling queue retunes log2(Q) times, not each step
    D,  # embedding width
    HALF,  # n: anchors per view on this rank
    ROW_OFFSET,  # global index of this rank's first sample
    N_GLOBAL,  # N: samples in the whole batch
    qk_scale,  # log2(e)/τ: logits are kept in base 2 so the exponentials are exp2
    BLOCK_M: tl.constexpr,  # anchors per program
    BLOCK_N: tl.constexpr,  # columns per tile of the inner loops
    BLOCK_D: tl.constexpr,  # next power of two ≥ D
    UPCAST: tl.constexpr,  # dot in fp32: the interpreter's native bf16 dot is wrong
    DOT_PRECISION: tl.constexpr,  # "tf32x3" for fp32 inputs (near-fp32 accuracy on tensor cores); ignored otherwise
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < M
    r = _load_rows(R, offs_m, M, stride_r, offs_d, D, UPCAST)
    own, pos = _anchor_columns(offs_m, HALF, ROW_OFFSET, N_GLOBAL)
    # -inf is a safe start: the first tile always holds a negative of every anchor — a queue column when Q > 0,
    # else a batch column that is neither the anchor's own nor its positive (≥ 16 columns, K ≥ 4; K = 2 without a
    # queue has no negatives and never gets here). Queue first for that reason.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    s_pos = tl.zeros([BLOCK_M], tl.float32)
    for start_q in range(0, NQ, BLOCK_N):
        offs_q = start_q + tl.arange(0, BLOCK_N)
        q = _load_rows(Q, offs_q, NQ, stride_q, offs_d, D, UPCAST)
        s = tl.dot(r, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        s = tl.where(offs_q[None, :] < NQ, s, float("-inf"))  # every queue column is a negative
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    for start_n in range(0, K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        c = _load_rows(C, offs_n, K, stride_c, offs_d, D, UPCAST)
        s = tl.dot(r, tl.trans(c), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        s_pos += tl.sum(tl.where(offs_n[None, :] == pos[:, None], s, 0.0), axis=1)
        # The running log-sum-exp is over the negatives only (own and positive masked): the loss and gradient are
        # then formed from softplus/sigmoid of lse_neg − s_pos, exact where the positive dominates.
        s = tl.where((offs_n[None, :] == own[:, None]) | (offs_n[None, :] == pos[:, None]) | (offs_n[None, :] >= K),
                     float("-inf"), s)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)
    margin = (lse2 - s_pos) * 0.6931471805599453  # natural log: lse_neg − s_pos
    # Kept in base 2 for the backward, which then recomputes exactly the exponent the forward summed.
    tl.store(LSE + offs_m, lse2, mask=row_ok)
    tl.store(W + offs_m, 1.0 / (1.0 + tl.exp(-margin)), mask=row_ok)
    tl.store(LOSS + offs_m, tl.maximum(margin, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(margin))), mask=row_ok)


@triton.autotune(configs=_configs("rows"), key=["M", "K", "NQ_TUNE", "D"], prune_configs_by=_pruner("rows"),
                 do_bench=_BENCH)
@triton.jit
def _bwd_rows_kernel(
    R,  # (M, D) normalized anchors
    C,  # (K, D) normalized batch columns
    Q,  # (NQ, D) normalized queue columns; unread when NQ = 0
    LSE,  # (M,) fp32 base-2 log-sum-exp over the negatives, from the forward
    W,  # (M,) fp32 1 − p_pos from the forward
    DR,  # (M, D) fp32 out: Σ_j (P − Y)_ij · column_j over batch and queue, unscaled (the host applies grad/(M·τ))
    stride_r,  # elements between rows of R
    stride_c,  # elements between rows of C
    stride_q,  # elements between rows of Q
    stride_dr,  # elements between rows of DR
    M,  # anchors, 2n
    K,  # batch columns, 2N
    NQ,  # queue columns
    NQ_TUNE,  # autotune key only: Q rounded up to a power of two
    D,  # embedding width
    HALF,  # n
    ROW_OFFSET,  # global index of this rank's first sample
    N_GLOBAL,  # N
    qk_scale,  # log2(e)/τ
    BLOCK_M: tl.constexpr,  # anchors per program
    BLOCK_N: tl.constexpr,  # columns per tile
    BLOCK_D: tl.constexpr,  # next power of two ≥ D
    UPCAST: tl.constexpr,  # dot in fp32 (interpreter)
    DOT_PRECISION: tl.constexpr,  # fp32 dot precision
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < M
    r = _load_rows(R, offs_m, M, stride_r, offs_d, D, UPCAST)
    own, pos = _anchor_columns(offs_m, HALF, ROW_OFFSET, N_GLOBAL)
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    w = tl.load(W + offs_m, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_q in range(0, NQ, BLOCK_N):
        offs_q = start_q + tl.arange(0, BLOCK_N)
        q = _load_rows(Q, offs_q, NQ, stride_q, offs_d, D, UPCAST)
        s = tl.dot(r, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        g = tl.where(offs_q[None, :] < NQ, w[:, None] * tl.exp2(s - lse2[:, None]), 0.0)  # negatives only
        acc += tl.dot(g.to(q.dtype), q, input_precision=DOT_PRECISION)
    for start_n in range(0, K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        c = _load_rows(C, offs_n, K, stride_c, offs_d, D, UPCAST)
        s = tl.dot(r, tl.trans(c), input_precision=DOT_PRECISION) * qk_scale
        # P − Y: a negative's p_j = (1 − p_pos)·softmax over the negatives; the positive's p_pos − 1 = −(1 − p_pos).
        g = w[:, None] * tl.exp2(s - lse2[:, None])
        g = tl.where(offs_n[None, :] == pos[:, None], -w[:, None], g)
        g = tl.where((offs_n[None, :] == own[:, None]) | (offs_n[None, :] >= K), 0.0, g)
        # g in the operands' dtype: bf16 tensor cores for bf16 inputs, as flash attention does with P.
        acc += tl.dot(g.to(c.dtype), c, input_precision=DOT_PRECISION)
    tl.store(DR + offs_m.to(tl.int64)[:, None] * stride_dr + offs_d[None, :], acc,
             mask=row_ok[:, None] & (offs_d < D)[None, :])


@triton.autotune(configs=_configs("cols"), key=["M", "K", "D"], prune_configs_by=_pruner("cols"), do_bench=_BENCH)
@triton.jit
def _bwd_cols_kernel(
    R,  # (M, D) normalized anchors
    C,  # (K, D) normalized batch columns (the queue has no gradient: this kernel never sees it)
    LSE,  # (M,) fp32 base-2 log-sum-exp over the negatives (queue included), from the forward
    W,  # (M,) fp32 1 − p_pos from the forward
    DC,  # (K, D) fp32 out: Σ_i (P − Y)_ij · R_i, unscaled
    stride_r,  # elements between rows of R
    stride_c,  # elements between rows of C
    stride_dc,  # elements between rows of DC
    M,  # anchors, 2n
    K,  # batch columns, 2N
    D,  # embedding width
    HALF,  # n
    ROW_OFFSET,  # global index of this rank's first sample
    N_GLOBAL,  # N
    qk_scale,  # log2(e)/τ
    BLOCK_M: tl.constexpr,  # anchors per tile of the inner loop
    BLOCK_N: tl.constexpr,  # columns per program
    BLOCK_D: tl.constexpr,  # next power of two ≥ D
    UPCAST: tl.constexpr,  # dot in fp32 (interpreter)
    DOT_PRECISION: tl.constexpr,  # fp32 dot precision
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    c = _load_rows(C, offs_n, K, stride_c, offs_d, D, UPCAST)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < M
        r = _load_rows(R, offs_m, M, stride_r, offs_d, D, UPCAST)
        own, pos = _anchor_columns(offs_m, HALF, ROW_OFFSET, N_GLOBAL)
        lse2 = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        w = tl.load(W + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(c, tl.trans(r), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M) = Sᵀ tile
        g_t = w[None, :] * tl.exp2(s_t - lse2[None, :])
        g_t = tl.where(offs_n[:, None] == pos[None, :], -w[None, :], g_t)
        # Padding anchors must contribute nothing: their "positive" index could name a real column.
        g_t = tl.where((offs_n[:, None] == own[None, :]) | (~row_ok[None, :]), 0.0, g_t)
        acc += tl.dot(g_t.to(r.dtype), r, input_precision=DOT_PRECISION)
    tl.store(DC + offs_n.to(tl.int64)[:, None] * stride_dc + offs_d[None, :], acc,
             mask=(offs_n < K)[:, None] & (offs_d < D)[None, :])


def _check(rows: torch.Tensor, cols: torch.Tensor, queue: torch.Tensor, row_offset: int, n_global: int) -> None:
    if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(f"rows (M, d) and cols (2N, d) must be 2-D with equal d, got {tuple(rows.shape)} "
                         f"and {tuple(cols.shape)}")
    if queue.dim() != 2 or queue.shape[1] != rows.shape[1]:
        raise ValueError(f"queue must be (Q, d) with the rows' d = {rows.shape[1]}, got {tuple(queue.shape)}")
    if rows.dtype != cols.dtype or rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"rows and cols must share one of fp32/bf16/fp16, got {rows.dtype} and {cols.dtype}")
    if rows.device != cols.device or queue.device != rows.device:
        raise ValueError(f"rows, cols and queue must be on one device, got {rows.device}, {cols.device} and "
                         f"{queue.device}")
    if not (rows.is_cuda or _INTERPRET):
        raise ValueError(f"the NT-Xent kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import), "
                         f"got {rows.device}")
    if rows.shape[1] > MAX_D[operand_bits(rows.dtype)]:
        raise ValueError(f"embedding width d must be ≤ {MAX_D[operand_bits(rows.dtype)]} for {rows.dtype} operands "
                         f"(fp32 128, bf16/fp16 256), got {rows.shape[1]}; use dot_dtype bf16/fp16 or the 'tiled' loss")
    if rows.shape[0] == 0 or rows.shape[0] % 2 or cols.shape[0] != 2 * n_global:
        raise ValueError(f"rows must hold 2n ≥ 2 anchors and cols 2·n_global={2 * n_global} columns, got "
                         f"{rows.shape[0]} and {cols.shape[0]}")
    if not 0 <= row_offset <= n_global - rows.shape[0] // 2:
        raise ValueError(f"row_offset {row_offset} puts {rows.shape[0] // 2} samples outside the {n_global} global ones")


def launch_constants(dtype: torch.dtype, d: int) -> dict:
    """The constexprs of a launch besides the tile shape, for ``dtype`` operands of width ``d`` (also what
    kernels/aot.py compiles with)."""
    return dict(BLOCK_D=block_d(d), UPCAST=_INTERPRET, DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32")


def _launch_args(rows, cols, row_offset, n_global, temperature):
    """Arguments shared by the three kernels after the pointers and strides."""
    m, d = rows.shape
    return dict(M=m, K=cols.shape[0], D=d, HALF=m // 2, ROW_OFFSET=row_offset, N_GLOBAL=n_global,
                qk_scale=_LOG2E / temperature, **launch_constants(rows.dtype, d))


def _tune_length(q: int) -> int:
    """The queue length the autotuner keys on: 0, or Q rounded up to a power of two (the memory grows a batch a step
    until full; keyed on Q itself, every step of the filling would autotune again)."""
    return triton.next_power_of_2(q) if q else 0


def _queue_pointer(queue, cols):
    """What the kernels get as Q: the queue, or with Q = 0 the columns (any valid pointer: the queue loops are empty,
    and an empty tensor's address may be null)."""
    return queue if queue.shape[0] else cols


def ntxent_forward(rows, cols, queue, row_offset, n_global, temperature):
    """Per-anchor (loss, base-2 lse over the negatives, 1 − p_pos), each (M,) fp32, of normalized ``rows`` against
    ``cols`` and ``queue`` (contiguous rows, one dtype)."""
    m = rows.shape[0]
    loss, lse, w = (torch.empty(m, device=rows.device, dtype=torch.float32) for _ in range(3))
    args = _launch_args(rows, cols, row_offset, n_global, temperature)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    q = _queue_pointer(queue, cols)
    _fwd_kernel[grid](rows, cols, q, loss, lse, w, rows.stride(0), cols.stride(0), q.stride(0),
                      NQ=queue.shape[0], NQ_TUNE=_tune_length(queue.shape[0]), **args)
    return loss, lse, w


def ntxent_backward(rows, cols, queue, lse, w, row_offset, n_global, temperature):
    """Unscaled (Σ_j (P−Y)_ij column_j, Σ_i (P−Y)_ij R_i), fp32, shapes of ``rows`` and ``cols``; none for the
    queue."""
    m, k = rows.shape[0], cols.shape[0]
    d_rows = torch.empty(rows.shape, device=rows.device, dtype=torch.float32)
    d_cols = torch.empty(cols.shape, device=cols.device, dtype=torch.float32)
    args = _launch_args(rows, cols, row_offset, n_global, temperature)
    q = _queue_pointer(queue, cols)
    _bwd_rows_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
        rows, cols, q, lse, w, d_rows, rows.stride(0), cols.stride(0), q.stride(0), d_rows.stride(0),
        NQ=queue.shape[0], NQ_TUNE=_tune_length(queue.shape[0]), **args)
    _bwd_cols_kernel[lambda meta: (triton.cdiv(k, meta["BLOCK_N"]),)](
        rows, cols, lse, w, d_cols, rows.stride(0), cols.stride(0), d_cols.stride(0), **args)
    return d_rows, d_cols


def _operands(rows, cols, queue, dot_dtype):
    """Contiguous copies in the dtype the tiles are multiplied in; ``cols`` that is ``rows`` (one process) stays one
    tensor."""
    dtype = dot_dtype or rows.dtype
    r = rows.to(dtype).contiguous()
    c = r if cols is rows else cols.to(dtype).contiguous()
    q = r.new_empty((0, rows.shape[1])) if queue is None else queue.to(dtype).contiguous()
    return r, c, q


class NTXentFunction(torch.autograd.Function):
    """Mean NT-Xent over the anchors ``rows`` against ``cols`` and the constant ``queue`` (or None); fp32 scalar.

    ``dot_dtype`` None multiplies in the inputs' dtype; bf16/fp16 casts the operands (tensor cores) and still
    returns the fp32 accumulators' gradients, in the inputs' dtypes. The queue gets no gradient.
    """

    @staticmethod
    def forward(ctx, rows, cols, row_offset, n_global, temperature, queue=None, dot_dtype=None):
        r, c, q = _operands(rows, cols, queue, dot_dtype)
        _check(r, c, q, row_offset, n_global)
        ctx.args = (row_offset, n_global, temperature)
        ctx.dtypes = (rows.dtype, cols.dtype)
        if c.shape[0] == 2 and q.shape[0] == 0:  # one sample, no queue: no negatives, the loss is 0 by definition
            ctx.zero = True
            ctx.shapes = (rows.shape, cols.shape)
            return rows.new_zeros((), dtype=torch.float32)
        ctx.zero = False
        loss, lse, w = ntxent_forward(r, c, q, row_offset, n_global, temperature)
        ctx.save_for_backward(r, c, q, lse, w)  # the operands: bf16 copies are half the bytes of the fp32 inputs
        return loss.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        rows_dtype, cols_dtype = ctx.dtypes
        if ctx.zero:
            rows_shape, cols_shape = ctx.shapes
            return (grad_loss.new_zeros(rows_shape, dtype=rows_dtype),
                    grad_loss.new_zeros(cols_shape, dtype=cols_dtype), None, None, None, None, None)
        r, c, q, lse, w = ctx.saved_tensors
        row_offset, n_global, temperature = ctx.args
        d_rows, d_cols = ntxent_backward(r, c, q, lse, w, row_offset, n_global, temperature)
        # ∂L/∂S = (P − Y)/M and S = rows·colsᵀ/τ; scaling here keeps the grad a device tensor (no host sync).
        scale = grad_loss / (r.shape[0] * temperature)
        return d_rows.mul_(scale).to(rows_dtype), d_cols.mul_(scale).to(cols_dtype), None, None, None, None, None


def ntxent(rows, cols, row_offset, n_global, temperature, queue=None, dot_dtype=None):
    """Mean NT-Xent of normalized ``rows`` (M, d) against ``cols`` (2N, d) and ``queue`` (Q, d) or None: the
    autograd function, with its trailing arguments optional."""
    return NTXentFunction.apply(rows, cols, row_offset, n_global, temperature, queue, dot_dtype)
