"""The tiled NT-Xent never reads a device value on the host (on CUDA each such read stalls the host until the device
has caught up, once per block); counted on the CPU with a function mode that sees forward and backward."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode

import fastclr.losses.tiled as tiled
from fastclr.losses import nt_xent

_READS = {Tensor.item, Tensor.__bool__, Tensor.__float__, Tensor.__int__, Tensor.tolist, Tensor.numpy,
          torch.nonzero, Tensor.nonzero, torch.argwhere, Tensor.argwhere, torch.masked_select, Tensor.masked_select}
_INDEXING = {Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put_, Tensor.index_put, torch.index_put}


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


class HostReads(TorchFunctionMode):
    """Records (the name of) every call whose result depends on device data read by the host: scalar reads, host
    copies, data-dependent shapes, boolean-mask indexing.

    The autograd engine runs backward without the caller's function modes (torch 2.13), so while this mode is on it
    also switches itself on inside every custom autograd function's backward (the hand-written ones: the tiled loss,
    the kernel's, the differentiable gather); built-in backward formulas are C++ and read nothing on the host
    here."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS or (func in _INDEXING and _bool_index(args)):
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        real, mode = BackwardCFunction.apply, self

        def apply(node, *args):
            TorchFunctionMode.__enter__(mode)
            try:
                return real(node, *args)
            finally:
                TorchFunctionMode.__exit__(mode, None, None, None)

        self._patch = mock.patch.object(BackwardCFunction, "apply", apply)
        self._patch.start()
        return super().__enter__()

    def __exit__(self, *exc):
        self._patch.stop()
        return super().__exit__(*exc)


class _Planted(torch.autograd.Function):
    """Every kind of read the mode must see, in a forward and a backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        if x.sum() > 0:  # __bool__
            x.max().item()
        torch.nonzero(x > 0)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad = grad.clone()
        grad[x < 0] = 0.0  # boolean-mask __setitem__
        grad.masked_select(x > 0).tolist()
        return grad * 2


def test_the_recorder_sees_reads_in_forward_and_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    with HostReads() as reads:
        _Planted.apply(x).sum().backward()
    assert reads.calls == ["__bool__", "item", "nonzero", "__setitem__", "masked_select", "tolist"], reads.calls


@pytest.mark.parametrize("queue_rows", [0, 23])
@pytest.mark.parametrize("floor", [False, True])
def test_tiled_loss_reads_nothing_on_the_host(queue_rows, floor, monkeypatch):
    """Forward and backward over many partial blocks (self and positive falling in and out of chunks), with and
    without a queue, with and without the underflow floor (τ = 0.01 takes it). The previous version, which found
    self and positive with torch.nonzero, made 216 reads here: 2 per (row block, column chunk), forward and
    backward."""
    monkeypatch.setattr(tiled, "DEFAULT_BLOCK_ROWS", 7)
    monkeypatch.setattr(tiled, "DEFAULT_BLOCK_COLS", 11)
    g = torch.Generator().manual_seed(0)
    z_a = torch.randn(29, 16, generator=g, requires_grad=True)
    z_b = torch.randn(29, 16, generator=g, requires_grad=True)
    queue = F.normalize(torch.randn(queue_rows, 16, generator=g), dim=1) if queue_rows else None
    with HostReads() as reads:
        loss = nt_xent(z_a, z_b, 0.01 if floor else 0.2, impl="tiled", queue=queue)
        loss.backward()
    assert reads.calls == []
    assert torch.isfinite(z_a.grad).all() and z_a.grad.abs().sum() > 0
