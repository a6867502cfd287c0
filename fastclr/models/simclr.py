"""SimCLR's network: encoder f(·) followed by projection head g(·) (Chen et al. 2020, sec. 2.1)."""
from __future__ import annotations

import torch
from torch import nn


class SimCLRModel(nn.Module):
    """``forward`` gives the projection z = g(f(x)) the contrastive loss is computed on; ``features`` gives the
    representation h = f(x) that evaluation and transfer use (the head is discarded after pretraining).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, out_dim)
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, feature_dim)
        return self.backbone(x)
