"""NT-Xent in blocks: online log-sum-exp forward, recompute-in-backward, O(N·d) memory (pure PyTorch).

This is the CPU path and the executable specification of the Triton kernel (kernels/ntxent.py): the same anchor
layout, the same per-row statistics (only the log-sum-exp is kept), the same gradient formula. Never more than one
block of rows × one chunk of columns of the similarity matrix exists at a time.

Anchor layout shared by every implementation. The global batch has N samples and two views; its 2N normalized
embeddings are ordered ``cols = [z_a of every sample; z_b of every sample]``. A caller scores M = 2n local anchors
``rows = [z_a[o:o+n]; z_b[o:o+n]]`` (o = ``row_offset``, the first global sample of the block) against all 2N
columns: anchor i < n sits at column o+i and its positive at N+o+i; anchor n+i sits at N+o+i, its positive at o+i.
One process is the case o = 0, n = N, rows = cols. An optional ``queue`` (Q, d) of extra normalized embeddings
(SimCLR v2's momentum-encoder memory, Chen et al. 2020b sec. 2, after MoCo, He et al. 2020) adds Q columns that are
negatives of every anchor; they are constants (no gradient), and Q = 0 is exactly the plain loss.

Nothing here reads a device value on the host: self and positive are located in each chunk by comparing column
indices (``_hits``) and masked with gathers/scatters of one entry per row, so a CUDA caller never waits.

Gradient. With S = rows·colsᵀ/τ, self-similarity masked out, P the row softmax and Y the one-hot of the positive,
L = (1/M) Σ_i (lse_i − S_i,pos(i)), so ∂L/∂S = (P − Y)/M and
    ∂L/∂rows = (P − Y)·cols / (M·τ),        ∂L/∂cols = (P − Y)ᵀ·rows / (M·τ).
When rows and cols are the same tensor autograd adds the two, which is the symmetric (G + Gᵀ)·Z of one process.
Queue columns only add their P·queue/(M·τ) to ∂L/∂rows (they are never a positive).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# exp of arguments below about -87 produces fp32 denormals or zero, and this CPU takes a slow path for those (measured
# here: ~7 ns per element instead of ~0.2). Such terms are < 1e-37 of the row's largest term, so flooring the
# argument changes the log-sum-exp by less than 2N·1e-37 relative; it is only applied when it can occur at all.
_EXP_FLOOR = -87.0

# Measured on the 2-core CPU of DESIGN.md at 2N = 16,384, d = 128, fp32 (benchmarks/ntxent.py): blocks of
# 512 rows × 4096 columns run the mm at full MKL speed while the block (8 MiB) keeps the elementwise passes cheap.
DEFAULT_BLOCK_ROWS = 512
DEFAULT_BLOCK_COLS = 4096


def anchor_columns(m: int, row_offset: int, n_global: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(self_col, pos_col), each (m,) int64: the column of each local anchor and of its positive (layout above)."""
    n = m // 2
    sample = torch.arange(row_offset, row_offset + n, device=device)
    view_a, view_b = sample, sample + n_global
    return torch.cat([view_a, view_b]), torch.cat([view_b, view_a])


def _hits(col: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, hit), each (rows, 1): where column ``col`` of each block row falls in the chunk [c0, c1) (clamped into
    it), and whether it lies there at all. Comparisons and clamps only: no data-dependent shape, so no host sync."""
    return (col - c0).clamp(0, c1 - c0 - 1)[:, None], ((col >= c0) & (col < c1))[:, None]


def _fill(block: torch.Tensor, hit: tuple[torch.Tensor, torch.Tensor], value) -> None:
    """In place: ``block[i, index[i]] = value`` on the rows where ``hit``, the others left as they are. O(rows)
    gathers and scatters rather than a (rows × cols) mask."""
    index, inside = hit
    block.scatter_(1, index, torch.where(inside, value, block.gather(1, index)))


def _block_probs(block: torch.Tensor, hits, shift: torch.Tensor, floor: bool) -> torch.Tensor:
    """In place: exp(block − shift[:, None]) with the entries of ``hits`` (self and positive) exactly 0."""
    for hit in hits:
        _fill(block, hit, float("-inf"))
    block.sub_(shift[:, None])
    if floor:
        block.clamp_min_(_EXP_FLOOR)
        block.exp_()
        for hit in hits:  # the floor lifted the masked entries off zero
            _fill(block, hit, 0.0)
    else:
        block.exp_()
    return block


def _chunks(cols: torch.Tensor, queue: torch.Tensor, block_cols: int):
    """(c0, chunk, in_batch): the batch's columns, then the queue's (extra negatives of every anchor)."""
    for c0 in range(0, cols.shape[0], block_cols):
        yield c0, cols[c0:c0 + block_cols], True
    for c0 in range(0, queue.shape[0], block_cols):
        yield c0, queue[c0:c0 + block_cols], False


def _check(rows: torch.Tensor, cols: torch.Tensor, queue: torch.Tensor, row_offset: int, n_global: int):
    if rows.dim() != 2 or cols.dim() != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(f"rows (M, d) and cols (2N, d) must be 2-D with equal d, got {tuple(rows.shape)} "
                         f"and {tuple(cols.shape)}")
    if queue.dim() != 2 or queue.shape[1] != rows.shape[1]:
        raise ValueError(f"queue must be (Q, d) with the rows' d = {rows.shape[1]}, got {tuple(queue.shape)}")
    if rows.shape[0] % 2 or cols.shape[0] != 2 * n_global:
        raise ValueError(f"rows must hold 2n anchors and cols 2·n_global={2 * n_global} columns, got "
                         f"{rows.shape[0]} and {cols.shape[0]}")
    if not 0 <= row_offset <= n_global - rows.shape[0] // 2:
        raise ValueError(f"row_offset {row_offset} puts {rows.shape[0] // 2} samples outside the {n_global} global ones")


class TiledNTXent(torch.autograd.Function):
    """Mean NT-Xent over the anchors in ``rows`` against every column of ``cols`` and ``queue`` (fp32, layout in
    module doc); the queue gets no gradient."""

    @staticmethod
    def forward(ctx, rows, cols, queue, row_offset, n_global, temperature, block_rows, block_cols):
        _check(rows, cols, queue, row_offset, n_global)
        m, k, q = rows.shape[0], cols.shape[0], queue.shape[0]
        if k == 2 and q == 0:  # one sample, no queue: no negatives, the loss is 0 by definition (so is its gradient)
            ctx.zero = True
            ctx.save_for_backward(rows, cols)
            return rows.new_zeros(())
        ctx.zero = False
        inv_t = 1.0 / temperature
        self_col, pos_col = anchor_columns(m, row_offset, n_global, rows.device)
        # Logits lie in [-1/τ, 1/τ] (unit rows), so exponent arguments are ≥ -2/τ - log(2N + Q).
        floor = 2.0 * inv_t + math.log(k + q) > -_EXP_FLOOR
        lse_neg, pos_logit = rows.new_empty(m), rows.new_empty(m)
        buf = rows.new_empty(min(block_rows, m) * min(block_cols, max(k, q)))
        for r0 in range(0, m, block_rows):
            r1 = min(r0 + block_rows, m)
            sc, pc = self_col[r0:r1], pos_col[r0:r1]
            run_max = torch.full((r1 - r0,), float("-inf"), dtype=rows.dtype, device=rows.device)
            run_sum = torch.zeros_like(run_max)
            for c0, chunk, in_batch in _chunks(cols, queue, block_cols):
                c1 = c0 + chunk.shape[0]
                block = buf[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                # (rows, cols) logits: the dot products, then × 1/τ, as the naive reference rounds. Not BLAS's
                # alpha: MKL on AVX-512 applies it to an input before the products (measured on an AMD EPYC: 6× the
                # gradient error at τ = 0.01), which the extra pass over the block avoids.
                torch.mm(rows[r0:r1], chunk.t(), out=block).mul_(inv_t)
                hits = []
                if in_batch:
                    # The running log-sum-exp is over the negatives only: self and positive are masked. The
                    # positive's logit is read from the block first, as in the kernel: a separate row-wise dot
                    # rounds differently. Every queue column is a negative of every anchor.
                    hits = [_hits(sc, c0, c1), _hits(pc, c0, c1)]
                    index, inside = hits[1]
                    pos_logit[r0:r1] = torch.where(inside, block.gather(1, index), pos_logit[r0:r1, None])[:, 0]
                    for hit in hits:
                        _fill(block, hit, float("-inf"))
                new_max = torch.maximum(run_max, block.amax(1))
                # A chunk may hold no negative of a row yet (only its self and positive): shift by 0 there.
                shift = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)
                _block_probs(block, hits, shift, floor)
                run_sum.mul_(torch.exp(run_max - shift)).add_(block.sum(1))
                run_max = new_max
            lse_neg[r0:r1] = run_max + run_sum.log()
        # loss_i = lse_i − s_pos = softplus(lse_neg − s_pos), and 1 − p_pos = sigmoid(lse_neg − s_pos): both exact
        # where the positive dominates, instead of differences of nearly equal numbers.
        margin = lse_neg - pos_logit
        ctx.save_for_backward(rows, cols, queue, lse_neg, torch.sigmoid(margin))
        ctx.args = (row_offset, n_global, temperature, block_rows, block_cols, floor)
        return F.softplus(margin).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.zero:
            rows, cols = ctx.saved_tensors
            return torch.zeros_like(rows), torch.zeros_like(cols), None, None, None, None, None, None
        rows, cols, queue, lse_neg, one_minus_p_pos = ctx.saved_tensors
        row_offset, n_global, temperature, block_rows, block_cols, floor = ctx.args
        m, k, q = rows.shape[0], cols.shape[0], queue.shape[0]
        self_col, pos_col = anchor_columns(m, row_offset, n_global, rows.device)
        d_rows = torch.zeros_like(rows)
        d_cols = torch.zeros_like(cols)
        buf = rows.new_empty(min(block_rows, m) * min(block_cols, max(k, q)))
        for r0 in range(0, m, block_rows):
            r1 = min(r0 + block_rows, m)
            sc, pc = self_col[r0:r1], pos_col[r0:r1]
            w = one_minus_p_pos[r0:r1, None]
            for c0, chunk, in_batch in _chunks(cols, queue, block_cols):
                c1 = c0 + chunk.shape[0]
                block = buf[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                torch.mm(rows[r0:r1], chunk.t(), out=block).mul_(1.0 / temperature)  # the logits, as in forward
                hits = [_hits(sc, c0, c1), _hits(pc, c0, c1)] if in_batch else []
                # Negatives: p_j = (1 − p_pos)·softmax over the negatives; positive: p_pos − 1 = −(1 − p_pos). Each
                # factor is exact where the positive dominates (no difference of nearly equal numbers).
                g = _block_probs(block, hits, lse_neg[r0:r1], floor).mul_(w)
                if in_batch:
                    _fill(g, hits[1], -w)
                d_rows[r0:r1].addmm_(g, chunk)
                if in_batch:  # queue columns are constants: no gradient is formed for them
                    d_cols[c0:c1].addmm_(g.t(), rows[r0:r1])
        scale = grad_loss / (m * temperature)
        return d_rows.mul_(scale), d_cols.mul_(scale), None, None, None, None, None, None


def ntxent_tiled(rows: torch.Tensor, cols: torch.Tensor, row_offset: int, n_global: int, temperature: float,
                 block_rows: int | None = None, block_cols: int | None = None,
                 queue: torch.Tensor | None = None) -> torch.Tensor:
    """Blockwise NT-Xent of normalized fp32 ``rows`` (M, d) against ``cols`` (2N, d) and the normalized extra
    negatives ``queue`` (Q, d) or None; scalar mean over the M anchors. The queue gets no gradient.

    Block sizes default to the module's DEFAULT_BLOCK_ROWS/COLS, read at call time.
    """
    block_rows = DEFAULT_BLOCK_ROWS if block_rows is None else block_rows
    block_cols = DEFAULT_BLOCK_COLS if block_cols is None else block_cols
    if block_rows < 1 or block_cols < 2:
        raise ValueError(f"block_rows must be ≥ 1 and block_cols ≥ 2, got {block_rows} and {block_cols}")
    if queue is None:
        queue = rows.new_empty((0, rows.shape[1]))
    return TiledNTXent.apply(rows, cols, queue, row_offset, n_global, temperature, block_rows, block_cols)
