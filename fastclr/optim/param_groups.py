"""The one place that decides which parameters get weight decay and LARS adaptation.

Weights of convolutions and linear layers do; BN scales/shifts and every bias do not (You et al. 2017; SimCLR,
Chen et al. 2020, excludes "batch_normalization" and "bias" variables from both). The rule is by shape: a tensor with
ndim <= 1 is a per-channel scale or shift, so new layer types are classified without a list of names.
"""
from __future__ import annotations

from torch import nn


def _is_excluded(param) -> bool:
    return param.ndim <= 1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups for ``model``'s trainable parameters: decayed+adapted weights, then the excluded rest.

    Empty groups are left out. Each group carries ``weight_decay`` and ``lars`` (read by ``LARS``).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay, excluded = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (excluded if _is_excluded(p) else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, lars=True),
              dict(params=excluded, weight_decay=0.0, lars=False)]
    return [g for g in groups if g["params"]]


def excluded_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters that get neither weight decay nor LARS adaptation (for logs and tests)."""
    return [name for name, p in model.named_parameters() if p.requires_grad and _is_excluded(p)]
