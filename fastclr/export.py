"""Writing networks out: the pretrained encoder as a plain state_dict and as safetensors, the projection head, a
fine-tuned or distilled network (``classifier.pt``), all loadable with ``weights_only=True`` (reading them back:
:mod:`fastclr.weights`; the command: ``fastclr export``). Every file is written atomically (a temporary file,
fsynced, then renamed over), so a crash leaves the previous file or the complete new one.

Key names: for a width-1 backbone with the standard stem and no SK the file loads with
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

import json
import os

import torch
from torch import nn

from . import atomic
from .weights import (BACKBONE_PREFIX, CLASSIFIER_FORMAT, META_KEY, NON_BACKBONE_PREFIXES, Weights,
                      strip_wrappers)


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's parameters and buffers as detached fp32 CPU copies (integer buffers keep their dtype).

    Accepts a bare backbone, a ``SimCLRModel`` (keeps ``backbone.*``, drops ``head.*``) or either one inside a
    DDP / DeepSpeed / torch.compile wrapper.
    """
    state = {strip_wrappers(k): v for k, v in model.state_dict().items()}
    if any(k.startswith(BACKBONE_PREFIX) for k in state):
        state = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(NON_BACKBONE_PREFIXES)}
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
    path = os.fspath(path)
    atomic.torch_save(backbone_state_dict(model), path)
    return path


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors stores neither strides nor shared storage); floats as fp32."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype,
                              memory_format=torch.contiguous_format, copy=True) for k, v in state.items()}


def save_safetensors(state: dict[str, torch.Tensor], path: str, meta: dict) -> str:
    from safetensors.torch import save

    atomic.write_bytes(path, save(_plain(state), metadata={META_KEY: json.dumps(meta)}))
    return path


def save_classifier(model: torch.nn.Module, path: str, config: dict, **meta) -> str:
    """A fine-tuned or distilled network as one weights_only-loadable file: its state_dict, the config that builds
    it, and ``meta`` (num_classes, head_layers, labels, figures)."""
    state = _plain({strip_wrappers(k): v for k, v in model.state_dict().items()})
    atomic.torch_save({"format": CLASSIFIER_FORMAT, "state_dict": state, "config": config, **meta}, path)
    return path


def export(weights: Weights, out_dir: str, head: bool = False) -> list[str]:
    """``backbone.pt`` (torchvision names; loads into torchvision's ResNet with ``strict=False``, only ``fc``
    missing), ``backbone.safetensors`` and, with ``head``, ``head.pt`` / ``head.safetensors`` (the projection head's
    ``mlp.*``, loadable into :class:`fastclr.models.ProjectionHead`); ``config.yaml`` beside them, so that
    ``fastclr eval`` and ``fastclr linear`` can rebuild the network from the export. Returns the paths written."""
    from .config import dump_config, from_dict
    from .config.schema import Config

    backbone = weights.backbone()
    if not backbone:
        raise ValueError(f"'{weights.path}' holds no backbone tensors to export")
    meta = {"kind": "backbone", "source": os.path.abspath(weights.path), "config": weights.config}
    out = [os.path.join(out_dir, "backbone.pt"), os.path.join(out_dir, "backbone.safetensors")]
    atomic.torch_save(_plain(backbone), out[0])
    save_safetensors(backbone, out[1], meta)
    if head:
        tensors = weights.head()
        if not tensors:
            raise ValueError(f"'{weights.path}' holds no projection head to export (an exported backbone has none)")
        out += [os.path.join(out_dir, "head.pt"), os.path.join(out_dir, "head.safetensors")]
        atomic.torch_save(_plain(tensors), out[2])
        save_safetensors(tensors, out[3], {**meta, "kind": "head"})
    if weights.config is not None:
        text = dump_config(from_dict(Config, weights.config), f"The config of the run that made {weights.path}.")
        out.append(os.path.join(out_dir, "config.yaml"))
        atomic.write_text(out[-1], text)
    return out
