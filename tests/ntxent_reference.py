"""Independent fp64 references of NT-Xent for the tests of every implementation (losses, kernel, distributed).

Two formulations that share no code with fastclr: a loop over anchors in numpy (the definition, written out) and
the two-halves cross-entropy form of the SimCLR reference code (Chen et al. 2020) in fp64 torch, whose autograd
gives reference gradients. ``test_reference_gradient_matches_finite_differences`` ties the two together.

Both take an optional ``queue`` (Q, d) of extra negatives (SimCLR v2's memory): used as given (not normalized, as
the loss takes it already normalized), appended to every anchor's candidates, never a positive, never
differentiated.
"""
import numpy as np
import torch
import torch.nn.functional as F


def loop_anchor_losses(z_a, z_b, temperature: float, queue=None) -> np.ndarray:
    """(2N,) fp64: −s_pos + log Σ_{j≠i} exp(s_ij) of anchor i = [a; b][i], one anchor at a time, stable LSE; j also
    runs over the queue's rows."""
    z = np.concatenate([np.asarray(z_a, dtype=np.float64), np.asarray(z_b, dtype=np.float64)])
    z = z / np.maximum(np.sqrt((z * z).sum(1, keepdims=True)), 1e-12)
    extra = np.zeros((0, z.shape[1])) if queue is None else np.asarray(queue, dtype=np.float64)
    two_n = z.shape[0]
    n = two_n // 2
    losses = np.empty(two_n)
    for i in range(two_n):
        sims = z @ z[i] / temperature  # (2N,)
        others = np.concatenate([np.delete(sims, i), extra @ z[i] / temperature])
        top = others.max()
        lse = top + np.log(np.exp(others - top).sum())
        losses[i] = lse - sims[(i + n) % two_n]
    return losses


def loop_loss(z_a, z_b, temperature: float, queue=None) -> float:
    """Mean over the 2N anchors of the loop reference."""
    return float(loop_anchor_losses(z_a, z_b, temperature, queue).mean())


def _rounded(u: torch.Tensor, z: torch.Tensor, operands) -> torch.Tensor:
    """``u`` (fp64 unit rows of ``z``) with the values a low-precision kernel multiplies — the fp32 unit rows rounded
    to ``operands`` — and the derivative of ``u`` (the cast passes the gradient straight through)."""
    if operands is None:
        return u
    return u + (F.normalize(z.detach().float(), dim=1, eps=1e-12).to(operands).double() - u).detach()


def halves_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, queue=None,
                operands=None) -> torch.Tensor:
    """fp64 NT-Xent as cross-entropy over [a·bᵀ, a·aᵀ, a·queueᵀ] and [b·aᵀ, b·bᵀ, b·queueᵀ] with the
    self-similarity masked; ``operands`` (e.g. torch.bfloat16) grades a kernel that multiplies in that dtype on the
    operands it really has, so that what remains is the error of its arithmetic and gradient path."""
    a = _rounded(F.normalize(z_a.double(), dim=1, eps=1e-12), z_a, operands)
    b = _rounded(F.normalize(z_b.double(), dim=1, eps=1e-12), z_b, operands)
    n = a.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    aa = (a @ a.t() / temperature).masked_fill(eye, float("-inf"))
    bb = (b @ b.t() / temperature).masked_fill(eye, float("-inf"))
    ab = a @ b.t() / temperature
    q = torch.zeros(0, a.shape[1], dtype=torch.float64) if queue is None else queue.detach()
    q = (q if operands is None else q.to(operands)).double()
    target = torch.arange(n)
    loss_a = F.cross_entropy(torch.cat([ab, aa, a @ q.t() / temperature], 1), target)
    loss_b = F.cross_entropy(torch.cat([ab.t(), bb, b @ q.t() / temperature], 1), target)
    return (loss_a + loss_b) / 2


def reference(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, queue=None, operands=None):
    """(loop loss, halves loss, grad_a, grad_b): fp64 loss two ways and the fp64 gradients of the halves form (the
    loop loss is always of the unrounded operands)."""
    a = z_a.detach().double().requires_grad_(True)
    b = z_b.detach().double().requires_grad_(True)
    loss = halves_loss(a, b, temperature, queue, operands)
    loss.backward()
    q = None if queue is None else queue.detach().double().numpy()
    return loop_loss(a.detach().numpy(), b.detach().numpy(), temperature, q), loss.item(), a.grad, b.grad


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (fp64): relative to the tensor's scale, so tiny entries do not
    dominate; 0 when both are exactly zero."""
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    scale = expected.detach().double().abs().max().item()
    return err / scale if scale > 0 else err


def streamed_reference(rows: torch.Tensor, cols: torch.Tensor, row_offset: int, n_global: int, temperature: float,
                       chunk: int = 1 << 18):
    """(loss, d_rows, d_cols) of anchors ``rows`` (M, d) against every column ``cols`` (2N, d), both already unit
    rows, in their own dtype (use fp64, or fp32 with TF32 off), with the columns streamed ``chunk`` at a time so the
    largest temporary is (M, chunk): for column counts whose (M, 2N) matrix would not fit. The plain formula, in two
    passes (log-sum-exp over each anchor's negatives, then the gradient (P − Y)/(M τ) through rows and columns);
    anchor layout as the kernels': anchor i < n is sample row_offset + i of view a, its own column row_offset + i,
    its positive N + row_offset + i; anchor n + i the reverse."""
    m, k = rows.shape[0], cols.shape[0]
    n = m // 2
    sample = row_offset + torch.arange(n, device=rows.device)
    own = torch.cat([sample, n_global + sample])
    pos = torch.cat([n_global + sample, sample])
    top = torch.full((m,), float("-inf"), dtype=rows.dtype, device=rows.device)
    total = torch.zeros(m, dtype=rows.dtype, device=rows.device)
    s_pos = torch.zeros(m, dtype=rows.dtype, device=rows.device)
    for j0 in range(0, k, chunk):
        j = torch.arange(j0, min(j0 + chunk, k), device=rows.device)
        s = rows @ cols[j0:j0 + len(j)].t() / temperature  # (M, c)
        s_pos += torch.where(j[None] == pos[:, None], s, 0.0).sum(1)
        s = s.masked_fill((j[None] == own[:, None]) | (j[None] == pos[:, None]), float("-inf"))
        new_top = torch.maximum(top, s.max(1).values)
        total = total * torch.exp(top - new_top) + torch.exp(s - new_top[:, None]).sum(1)
        top = new_top
    lse = top + torch.log(total)  # over the negatives
    loss = F.softplus(lse - s_pos).mean()
    w = torch.sigmoid(lse - s_pos)  # 1 − p_pos
    d_rows, d_cols = torch.zeros_like(rows), torch.empty_like(cols)
    for j0 in range(0, k, chunk):
        j = torch.arange(j0, min(j0 + chunk, k), device=rows.device)
        c = cols[j0:j0 + len(j)]
        g = w[:, None] * torch.exp(rows @ c.t() / temperature - lse[:, None])
        g = torch.where(j[None] == pos[:, None], -w[:, None], g).masked_fill(j[None] == own[:, None], 0.0)
        d_rows += g @ c / (m * temperature)
        d_cols[j0:j0 + len(j)] = g.t() @ rows / (m * temperature)
    return loss, d_rows, d_cols
