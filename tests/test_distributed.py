"""Global negatives on gloo: every rank's loss and input gradient against the single-process loss of the whole batch."""
import os

import pytest
import torch
import torch.nn.functional as F

from tests.multiproc import run_ranks
from tests.ntxent_reference import reference, scaled_error


def _rank_loss(rank, world, z_a, z_b, tau, impl, queue):
    from fastclr.losses import nt_xent

    n = z_a.shape[0] // world
    a = z_a[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    b = z_b[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = nt_xent(a, b, tau, impl=impl, group="world", queue=queue)
    loss.backward()
    return {"loss": loss.item(), "ga": a.grad, "gb": b.grad}


# A queue of extra negatives (the same on every rank, as SimCLR v2's memory is) in some of the cases.
@pytest.mark.parametrize("world, impl, queue_rows", [(2, "naive", 0), (2, "tiled", 0), (3, "naive", 0),
                                                     (3, "tiled", 0), (2, "naive", 13), (3, "tiled", 13)])
def test_global_negatives_equal_single_process(world, impl, queue_rows):
    g = torch.Generator().manual_seed(world)
    n = 7 * world  # 7 samples per rank: no block size divides it
    z_a = torch.randn(n, 24, generator=g)
    z_b = z_a + 0.7 * torch.randn(n, 24, generator=g)
    queue = F.normalize(torch.randn(queue_rows, 24, generator=g), dim=1) if queue_rows else None
    ref_loss, _, grad_a, grad_b = reference(z_a, z_b, 0.2, queue)
    outs = run_ranks(_rank_loss, world, z_a, z_b, 0.2, impl, queue)
    # The ranks' mean loss is the global loss.
    assert abs(sum(o["loss"] for o in outs) / world - ref_loss) <= 1e-5 * max(abs(ref_loss), 1.0)
    # Each rank's gradient is world × its slice of the global one: gradient averaging over ranks then gives exactly
    # the single-process update. A gather without backward would miss the other ranks' terms here.
    scale = max(grad_a.abs().max().item(), grad_b.abs().max().item())
    for r, o in enumerate(outs):
        rows = slice(r * 7, (r + 1) * 7)
        torch.testing.assert_close(o["ga"].double() / world, grad_a[rows], rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(o["gb"].double() / world, grad_b[rows], rtol=0, atol=1e-5 * scale)


def _bf16_gathered(z_a, z_b, tau, queue, world, rank):
    """The cast order nt_xent had before: rows cast to bf16 and then gathered, so the kernel returns bf16 gradients
    and the gather's backward sums them in bf16."""
    from fastclr.distributed import all_gather_with_grad
    from kernels import ntxent as kernel

    n, d = z_a.shape
    rows = F.normalize(torch.cat([z_a, z_b]).float(), dim=1, eps=1e-12).to(z_a.dtype)
    cols = all_gather_with_grad(rows, "world").view(world, 2, n, d).transpose(0, 1).reshape(2 * world * n, d)
    return kernel.ntxent(rows, cols, rank * n, world * n, tau, queue.to(z_a.dtype))


def _rank_bf16_orders(rank, world, z_a, z_b, tau, queue):
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported: @triton.jit reads it then
    from fastclr.losses import nt_xent

    n = z_a.shape[0] // world
    grads = {}
    for order in ("fp32 gather", "bf16 gather"):
        a = z_a[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        b = z_b[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        if order == "fp32 gather":
            loss = nt_xent(a, b, tau, impl="triton", group="world", queue=queue)
        else:
            loss = _bf16_gathered(a, b, tau, queue, world, rank)
        loss.backward()
        grads[order] = torch.cat([a.grad, b.grad]).float()
    return grads


def test_bf16_cross_rank_gradients_are_summed_in_fp32():
    """4 ranks, bf16 inputs, the Triton kernels (interpreter without a GPU), a queue: the gradient against the fp64
    single-process reference of the operands the kernel multiplies (its bf16 unit rows), so that what is graded is
    the gradient path.

    Views 0.1 apart make each embedding's gradient mostly radial, which normalization's backward removes: a gradient
    rounded to bf16 before that (the kernel's output, the bf16 sum over ranks) keeps its rounding error in what is
    left. Measured over 6 seeds: fp32 gather ≤ 3.0e-3 (the final rounding to the bf16 input dtype alone is up to
    2^-9 = 2.0e-3, the kernel's bf16 probabilities add about as much), bf16 gather ≥ 1.05e-2 (this seed: 2.2e-3 and
    1.5e-2). 5e-3 separates the two orders with a factor 2 on either side."""
    world, n, d, tau = 4, 5, 32, 0.2
    g = torch.Generator().manual_seed(0)
    z_a = torch.randn(world * n, d, generator=g)
    z_b = (z_a + 0.1 * torch.randn(world * n, d, generator=g)).bfloat16()
    z_a = z_a.bfloat16()
    queue = F.normalize(torch.randn(19, d, generator=g, dtype=torch.float64), dim=1).float()
    _, _, grad_a, grad_b = reference(z_a, z_b, tau, queue, operands=torch.bfloat16)
    outs = run_ranks(_rank_bf16_orders, world, z_a, z_b, tau, queue)
    want = torch.cat([grad_a, grad_b])

    def error(order):  # rank r's rows are [a slice; b slice]; divide out the world × of the data-parallel mean
        got = torch.cat([torch.cat([o[order][:n] for o in outs]), torch.cat([o[order][n:] for o in outs])]) / world
        return scaled_error(got, want)

    assert error("fp32 gather") <= 5e-3
    assert error("bf16 gather") > 5e-3  # the tolerance would catch the old order
