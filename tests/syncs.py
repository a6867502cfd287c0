"""Counting host syncs on a CPU: every call that would make a CUDA host wait for the device.

On a GPU, ``tensor.item()``, ``bool(tensor)``, ``tolist``/``numpy``, ``nonzero``, boolean-mask indexing and
``synchronize()`` stall the host until the device has caught up; on a CPU they cost nothing and so hide. The
:class:`HostSyncs` mode sees every one of them as the ATen operator it comes down to, forward and backward (plus the
accelerator and ``torch.cuda`` synchronize functions, wrapped while the mode is on, and tolist/numpy), and records
the project call site.

Tensors born on the host from Python data (``torch.tensor([...])`` of flags, and what is computed from such tensors
alone) are control data: on a GPU machine they stay in CPU memory, so reading them is no sync and is not counted.
"""
from __future__ import annotations

import os
import traceback
from collections import Counter
import weakref
from contextlib import ExitStack
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR = "aten::_local_scalar_dense"  # item(), bool(), float(), int() of a tensor
_DATA_DEPENDENT = ("aten::nonzero", "aten::argwhere", "aten::masked_select", "aten::_unique", "aten::_unique2",
                   "aten::unique_dim", "aten::unique_consecutive")
_INDEXING = ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")
_BORN = ("aten::lift_fresh", "aten::lift_fresh_copy", "aten::scalar_tensor")  # torch.tensor(python data)
_HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy}  # read the data without an ATen op
_HERE = os.path.dirname(os.path.abspath(__file__))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _site() -> str:
    """The innermost frame of project code (fastclr, kernels, benchmarks) that made the call."""
    frames = traceback.extract_stack()[:-2]
    root = os.path.dirname(_HERE)
    for f in reversed(frames):
        # Relative to the checkout, so that a checkout that is itself in a folder named fastclr/ (or an installed
        # package's site-packages) does not pass for project code.
        rel = os.path.relpath(f.filename, root)
        if rel.startswith(("fastclr/", "kernels/", "benchmarks/", "tests/test_")):
            return f"{rel}:{f.lineno} {f.line}"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} {f.line}"


class _Copies(TorchFunctionMode):
    """tolist()/numpy(): host copies that no ATen op shows."""

    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_COPIES and not all(self.owner._is_host(t) for t in _tensors(args)):
            self.owner.calls.append((func.__name__, _site()))
        return func(*args, **(kwargs or {}))


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as s: ...``; then ``s.calls`` lists (what, call site), ``len(s)`` their count.

    A dispatch mode, so that it sees the backward pass too (custom autograd functions included), which a function
    mode does not."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self._host: dict[int, weakref.ref] = {}  # id -> weak reference (tensors compare elementwise, not by id)
        self._stack = ExitStack()

    def __len__(self) -> int:
        return len(self.calls)

    def report(self) -> str:
        """One line per distinct (what, call site), with its count."""
        counts = Counter(self.calls)
        return "\n".join(f"  {n} x {what} at {site}" for (what, site), n in counts.most_common()) or "  (none)"

    def _sync(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, _site()))
        return record

    def _is_host(self, t) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def __enter__(self):
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        self._stack.enter_context(mock.patch.object(type(accel), "synchronize", self._sync("accelerator.synchronize")))
        self._stack.enter_context(mock.patch.object(torch.cuda, "synchronize", self._sync("torch.cuda.synchronize")))
        self._stack.enter_context(_Copies(self))
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._stack.close()
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        host_born = bool(inputs) and all(self._is_host(t) for t in inputs)
        if not host_born:
            if name == _SCALAR:
                self.calls.append(("item/bool/float of a tensor", _site()))
            elif name in _DATA_DEPENDENT or (name in _INDEXING and _bool_index(args)):
                self.calls.append((f"{name} (data-dependent shape)", _site()))
        out = func(*args, **kwargs)
        if name in _BORN or host_born:
            for t in _tensors(out):
                self._host[id(t)] = weakref.ref(t)
        return out
