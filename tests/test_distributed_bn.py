import pytest
import torch

from fastclr.distributed import GlobalBatchNorm
from tests.multiproc import run_ranks


def _bn_rank(rank, world, x, dy, group_size):
    from fastclr.distributed import global_bn_layer

    torch.manual_seed(0)
    bn = global_bn_layer(group_size)(x.shape[1])
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1]))
        bn.bias.copy_(torch.linspace(-1, 1, x.shape[1]))
    n = x.shape[0] // world
    xs = x[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    y = bn(xs)
    y.backward(dy[rank * n:(rank + 1) * n])
    return {"y": y.detach(), "dx": xs.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "rm": bn.running_mean, "rv": bn.running_var, "cl": y.is_contiguous(memory_format=torch.channels_last)}


def _reference(x, dy):
    bn = torch.nn.BatchNorm1d(x.shape[1]) if x.dim() == 2 else torch.nn.BatchNorm2d(x.shape[1])
    bn = bn.double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, x.shape[1]))
        bn.bias.copy_(torch.linspace(-1, 1, x.shape[1]))
    xd = x.double().requires_grad_(True)
    y = bn(xd)
    y.backward(dy.double())
    return y, xd.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shape", [(12, 5, 7, 3), (18, 11)])
def test_global_bn_equals_single_process_bn(world, shape):
    g = torch.Generator().manual_seed(world)
    x = torch.randn(*shape, generator=g) * 3 + 1
    dy = torch.randn(*shape, generator=g)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    ry, rdx, rdw, rdb, rrm, rrv = _reference(x, dy)
    outs = run_ranks(_bn_rank, world, x, dy, world)
    n = shape[0] // world
    for r, o in enumerate(outs):
        torch.testing.assert_close(o["y"].double(), ry[r * n:(r + 1) * n], rtol=1e-5, atol=1e-5)
        # The input gradient is exact per rank: every rank's dy reaches every input through the shared statistics.
        torch.testing.assert_close(o["dx"].double(), rdx[r * n:(r + 1) * n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o["rm"].double(), rrm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o["rv"].double(), rrv, rtol=1e-5, atol=1e-6)
        if x.dim() == 4:
            assert o["cl"]
    # Parameter gradients are local sums; their sum over ranks (what gradient averaging rescales) is the global one.
    torch.testing.assert_close(sum(o["dw"] for o in outs).double(), rdw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(o["db"] for o in outs).double(), rdb, rtol=1e-5, atol=1e-5)


def test_bn_groups_normalize_within_each_group_only():
    x = torch.randn(16, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    x[8:] += 10  # ranks 2-3 see very different data than ranks 0-1
    dy = torch.randn_like(x)
    outs = run_ranks(_bn_rank, 4, x, dy, 2)
    for half in (0, 1):
        ry, rdx, *_ = _reference(x[half * 8:(half + 1) * 8], dy[half * 8:(half + 1) * 8])
        for r in (2 * half, 2 * half + 1):
            local = r - 2 * half
            torch.testing.assert_close(outs[r]["y"].double(), ry[local * 4:(local + 1) * 4], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(outs[r]["dx"].double(), rdx[local * 4:(local + 1) * 4], rtol=1e-5, atol=1e-5)


def test_eval_mode_uses_running_stats_without_collectives():
    bn = GlobalBatchNorm(4)
    bn.eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(bn(x), x / (1 + bn.eps) ** 0.5)
