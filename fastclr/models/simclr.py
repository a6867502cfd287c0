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


def build_model(cfg, norm_layer=None) -> SimCLRModel:
    """The SimCLR network of a :class:`fastclr.config.ModelConfig`; ``norm_layer(num_features)`` replaces
    ``nn.BatchNorm2d``/``nn.BatchNorm1d`` everywhere (the cross-rank BN, for instance)."""
    from .heads import ProjectionHead
    from .resnet import build_backbone

    backbone = build_backbone(cfg.arch, width_mult=cfg.width_mult, cifar_stem=cfg.cifar_stem, norm_layer=norm_layer,
                              zero_init_residual=cfg.zero_init_residual, sk_ratio=cfg.sk_ratio,
                              stem_stride=cfg.stem_stride)
    head = ProjectionHead(backbone.feature_dim, cfg.proj_hidden_dim, cfg.proj_out_dim, num_layers=cfg.proj_layers,
                          norm_layer=norm_layer or nn.BatchNorm1d)
    return SimCLRModel(backbone, head)
