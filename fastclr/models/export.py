"""Export of the pretrained encoder as a plain state_dict with torchvision's ResNet key names (no ``fc``).

For a width-1 backbone with the standard stem and no SK the file loads with
``torchvision.models.resnet50().load_state_dict(torch.load(path), strict=False)`` (likewise resnet18/34/101/152),
reporting only ``fc.weight`` and ``fc.bias`` as missing. Wider backbones keep the names with wider tensors.

Selective kernels (``sk_ratio`` > 0, SimCLR v2) have no torchvision counterpart; their keys extend torchvision's
scheme (and follow timm's ``resnet50d`` for the ResNet-D parts):

- stem ``conv1.0.weight``, ``conv1.1.*`` (BN), ``conv1.3.weight``, ``conv1.4.*``, ``conv1.6.weight``, then ``bn1.*``
  (the 7x7 ``conv1.weight`` is gone);
- in each block, the strided 3x3 (``conv2`` of a Bottleneck, ``conv1`` of a BasicBlock) and its BN keep their
  names with 2·width output channels (the two paths), followed by the attention ``sk.fc_reduce.weight``
  (mid, width, 1, 1), ``sk.bn.*`` (mid) and ``sk.fc_select.weight`` (2·width, mid, 1, 1);
- projection shortcuts ``downsample.1.weight`` (1x1 conv) and ``downsample.2.*`` (BN): ``downsample.0`` is the
  parameter-free average pool.
"""
from __future__ import annotations

import os

import torch
from torch import nn

_BACKBONE_PREFIX = "backbone."
_NON_BACKBONE_PREFIXES = ("head.", "fc.")


def _strip_wrappers(key: str) -> str:
    """Drop what wrappers add to a key: DDP/DeepSpeed's leading ``module.``, torch.compile's ``_orig_mod.``."""
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's parameters and buffers as detached fp32 CPU copies (integer buffers keep their dtype).

    Accepts a bare backbone, a ``SimCLRModel`` (keeps ``backbone.*``, drops ``head.*``) or either one inside a
    DDP / DeepSpeed / torch.compile wrapper.
    """
    state = {_strip_wrappers(k): v for k, v in model.state_dict().items()}
    if any(k.startswith(_BACKBONE_PREFIX) for k in state):
        state = {k[len(_BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(_BACKBONE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(_NON_BACKBONE_PREFIXES)}
    if not state:
        raise ValueError(f"{type(model).__name__} has no backbone parameters to export")
    out = {}
    for k, v in state.items():
        dtype = torch.float32 if v.is_floating_point() else v.dtype
        # A fresh contiguous copy: no autograd history, no channels_last strides, no storage shared with training.
        out[k] = v.detach().to(device="cpu", dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    return out


def save_backbone(model: nn.Module, path: str | os.PathLike) -> str:
    """Write ``backbone_state_dict(model)`` to ``path`` atomically; returns the path.

    The bytes go to a temporary file in the same directory, are fsynced, and then ``os.replace`` swaps it in, so a
    crash at any moment leaves either the previous file or the complete new one, never a truncated file.
    """
    from ..atomic import torch_save

    path = os.fspath(path)
    torch_save(backbone_state_dict(model), path)
    return path
