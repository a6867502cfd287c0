"""Global negatives on gloo: every rank's loss and input gradient against the single-process loss of the whole batch."""
import pytest
import torch

from tests.multiproc import run_ranks
from tests.ntxent_reference import reference


def _rank_loss(rank, world, z_a, z_b, tau, impl):
    from fastclr.losses import nt_xent

    n = z_a.shape[0] // world
    a = z_a[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    b = z_b[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = nt_xent(a, b, tau, impl=impl, group="world")
    loss.backward()
    return {"loss": loss.item(), "ga": a.grad, "gb": b.grad}


@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize("world", [2, 3])
def test_global_negatives_equal_single_process(world, impl):
    g = torch.Generator().manual_seed(world)
    n = 7 * world  # 7 samples per rank: no block size divides it
    z_a = torch.randn(n, 24, generator=g)
    z_b = z_a + 0.7 * torch.randn(n, 24, generator=g)
    ref_loss, _, grad_a, grad_b = reference(z_a, z_b, 0.2)
    outs = run_ranks(_rank_loss, world, z_a, z_b, 0.2, impl)
    # The ranks' mean loss is the global loss.
    assert abs(sum(o["loss"] for o in outs) / world - ref_loss) <= 1e-5 * max(abs(ref_loss), 1.0)
    # Each rank's gradient is world × its slice of the global one: gradient averaging over ranks then gives exactly
    # the single-process update. A gather without backward would miss the other ranks' terms here.
    scale = max(grad_a.abs().max().item(), grad_b.abs().max().item())
    for r, o in enumerate(outs):
        rows = slice(r * 7, (r + 1) * 7)
        torch.testing.assert_close(o["ga"].double() / world, grad_a[rows], rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(o["gb"].double() / world, grad_b[rows], rtol=0, atol=1e-5 * scale)
