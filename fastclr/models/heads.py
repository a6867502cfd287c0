"""The SimCLR projection head g(·): an MLP from backbone features h to the embedding z the loss sees."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _strip_affine(norm: nn.Module) -> nn.Module:
    """Turn a freshly built BatchNorm into its ``affine=False`` form.

    Done on the module rather than by passing ``affine=False`` so that any ``norm_layer(num_features)`` factory
    (e.g. the cross-rank BN one) works unchanged. Other norm types are returned as they are.
    """
    if isinstance(norm, nn.modules.batchnorm._NormBase) and norm.affine:
        norm.affine = False
        norm.weight = None  # registers the parameter slot as None, exactly as affine=False construction does
        norm.bias = None
    return norm


class ProjectionHead(nn.Module):
    """``num_layers`` linear layers: Linear→BN→ReLU for all but the last, then Linear→BN without ReLU.

    SimCLR v1 uses 2 layers, SimCLR v2 3 (Chen et al. 2020b, "Big Self-Supervised Models are Strong Semi-Supervised
    Learners": a deeper head). As in the reference TF code (google-research/simclr ``model_util.projection_head`` and
    ``linear_layer``), every layer is batch-normalized, its Linear has no bias (the BN shift replaces it), and the
    output layer has neither bias nor ReLU. That code keeps a BN scale (γ) but no shift (β) on the output; here the
    output BN has no affine parameters at all, as in MoCo v3's SimCLR-style projector (Chen, Xie & He 2021), which
    keeps it a standard ``affine=False`` BatchNorm that every BN implementation (local or cross-rank) supports.
    ``norm_layer=None`` gives the plain MLP of the SimCLR paper's description (biases, no BN).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm1d):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim),
                            ("num_layers", num_layers)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"ProjectionHead {name} must be an int >= 1, got {value!r}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            last = i == num_layers - 1
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=norm_layer is None))
            if norm_layer is not None:
                norm = norm_layer(dims[i + 1])
                layers.append(_strip_affine(norm) if last else norm)
            if not last:
                layers.append(nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, out_dim)
        return self.mlp(h)
