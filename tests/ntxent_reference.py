"""Independent fp64 references of NT-Xent for the tests of every implementation (losses, kernel, distributed).

Two formulations that share no code with fastclr: a loop over anchors in numpy (the definition, written out) and
the two-halves cross-entropy form of the SimCLR reference code (Chen et al. 2020) in fp64 torch, whose autograd
gives reference gradients. ``test_reference_gradient_matches_finite_differences`` ties the two together.
"""
import numpy as np
import torch
import torch.nn.functional as F


def loop_anchor_losses(z_a, z_b, temperature: float) -> np.ndarray:
    """(2N,) fp64: −s_pos + log Σ_{j≠i} exp(s_ij) of anchor i = [a; b][i], one anchor at a time, stable LSE."""
    z = np.concatenate([np.asarray(z_a, dtype=np.float64), np.asarray(z_b, dtype=np.float64)])
    z = z / np.maximum(np.sqrt((z * z).sum(1, keepdims=True)), 1e-12)
    two_n = z.shape[0]
    n = two_n // 2
    losses = np.empty(two_n)
    for i in range(two_n):
        sims = z @ z[i] / temperature  # (2N,)
        others = np.delete(sims, i)
        top = others.max()
        lse = top + np.log(np.exp(others - top).sum())
        losses[i] = lse - sims[(i + n) % two_n]
    return losses


def loop_loss(z_a, z_b, temperature: float) -> float:
    """Mean over the 2N anchors of the loop reference."""
    return float(loop_anchor_losses(z_a, z_b, temperature).mean())


def halves_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp64 NT-Xent as cross-entropy over [a·bᵀ, a·aᵀ] and [b·aᵀ, b·bᵀ] with the self-similarity masked."""
    a = F.normalize(z_a.double(), dim=1, eps=1e-12)
    b = F.normalize(z_b.double(), dim=1, eps=1e-12)
    n = a.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    aa = (a @ a.t() / temperature).masked_fill(eye, float("-inf"))
    bb = (b @ b.t() / temperature).masked_fill(eye, float("-inf"))
    ab = a @ b.t() / temperature
    target = torch.arange(n)
    loss_a = F.cross_entropy(torch.cat([ab, aa], 1), target)
    loss_b = F.cross_entropy(torch.cat([ab.t(), bb], 1), target)
    return (loss_a + loss_b) / 2


def reference(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float):
    """(loop loss, halves loss, grad_a, grad_b): fp64 loss two ways and the fp64 gradients of the halves form."""
    a = z_a.detach().double().requires_grad_(True)
    b = z_b.detach().double().requires_grad_(True)
    loss = halves_loss(a, b, temperature)
    loss.backward()
    return loop_loss(a.detach().numpy(), b.detach().numpy(), temperature), loss.item(), a.grad, b.grad


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (fp64): relative to the tensor's scale, so tiny entries do not
    dominate; 0 when both are exactly zero."""
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    scale = expected.detach().double().abs().max().item()
    return err / scale if scale > 0 else err
