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


class _RecordBNBackward(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten.native_batch_norm_backward call: its arguments and outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.native_batch_norm_backward.default:
            self.calls.append((args, out))
        return out


@pytest.mark.parametrize("shape,dtype", [((6, 5, 4, 3), torch.float32), ((6, 5, 4, 3), torch.bfloat16),
                                         ((14, 9), torch.float32), ((14, 9), torch.bfloat16)])
def test_backward_passes_the_saved_statistics_that_cuda_reads(shape, dtype):
    """ATen's CUDA backward reads (save_mean, save_invstd) for channels_last 4-D and 2-D inputs and asserts they are
    defined; its CPU kernel and its CUDA NCHW kernel read (running_mean, running_var) in eval mode. The layer must
    pass both pairs, describing the same statistics: computed here the CUDA way from the saved pair, the outputs
    equal what the CPU kernel returned, and the whole backward equals the fp64 reference."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(*shape, generator=g).to(dtype)
    bn = GlobalBatchNorm(shape[1])
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
        bn.bias.copy_(torch.linspace(-1, 1, shape[1]))
    xs = x.clone().requires_grad_(True)
    with _RecordBNBackward() as rec:
        bn(xs).backward(dy)
    assert len(rec.calls) == 1
    (g_out, inp, w, run_mean, run_var, save_mean, save_invstd, train, eps, _), (dx, dw, db) = rec.calls[0]
    assert not train and save_mean is not None and save_invstd is not None
    for t in (save_mean, save_invstd, run_mean, run_var):
        assert t.dtype == torch.float32 and t.shape == (shape[1],)
    torch.testing.assert_close(save_mean, run_mean, rtol=0, atol=0)
    torch.testing.assert_close(save_invstd, torch.rsqrt(run_var + eps), rtol=1e-6, atol=0)
    # CUDA's channels-last/2-D formulas, from the saved pair only.
    dims = [0] + list(range(2, inp.dim()))
    view = [1, -1] + [1] * (inp.dim() - 2)
    xhat = (inp.double() - save_mean.double().view(view)) * save_invstd.double().view(view)
    want_dx = g_out.double() * (w.double() * save_invstd.double()).view(view)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), want_dx, **tol)
    torch.testing.assert_close(dw.double(), (g_out.double() * xhat).sum(dims), **tol)
    torch.testing.assert_close(db.double(), g_out.double().sum(dims), **tol)
    # And the layer's whole backward against the fp64 reference.
    _, rdx, rdw, rdb, _, _ = _reference(x.float(), dy.float())
    torch.testing.assert_close(xs.grad.double(), rdx, **tol)
    torch.testing.assert_close(bn.weight.grad.double(), rdw, **tol)
    torch.testing.assert_close(bn.bias.grad.double(), rdb, **tol)
