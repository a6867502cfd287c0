"""ResNet-18/34/50 backbones (He et al. 2016) whose state_dict keys are torchvision's, minus ``fc``.

The blocks are ResNet v1.5: a Bottleneck strides in its 3x3 conv, not its first 1x1 (the variant torchvision and
NVIDIA's reference ship). Modules are registered in torchvision's order under torchvision's names, so an exported
backbone (width 1, standard stem) loads into ``torchvision.models.resnet50()`` with ``strict=False``, only ``fc``
missing. The forward returns the globally pooled features ``(B, feature_dim)``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import Arch, choices

NormLayer = Callable[[int], nn.Module]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _downsample(in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer) -> nn.Module | None:
    """Projection shortcut (1x1 conv + norm) where the identity's shape would not match; None where it would."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm_layer(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, norm_layer: NormLayer):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = norm_layer(width)
        self.downsample = _downsample(in_channels, width, stride, norm_layer)

    @property
    def residual_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, width, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce → 3x3 (carries the stride: v1.5) → 1x1 expand ×4 (ResNet-50)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, norm_layer: NormLayer):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride, norm_layer)

    @property
    def residual_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, 4·width, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet ResNet without the classifier; ``feature_dim`` is the width of the pooled output.

    ``width_mult`` scales every stage (64·w, 128·w, 256·w, 512·w channels, rounded, at least 1); ``cifar_stem``
    replaces the 7x7/2 conv + max-pool by a 3x3/1 conv for 32-px images (SimCLR's CIFAR-10 variant, Chen et al.
    2020, appendix B.9); ``zero_init_residual`` starts every block as the identity (Goyal et al. 2017).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], *,
                 width_mult: float = 1.0, cifar_stem: bool = False, norm_layer: NormLayer | None = None,
                 zero_init_residual: bool = False):
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        norm_layer = norm_layer or nn.BatchNorm2d
        widths = [max(1, int(round(c * width_mult))) for c in (64, 128, 256, 512)]
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, stride=2, padding=1)
        channels = widths[0]
        for i, (width, num_blocks) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(channels, width, stride, norm_layer))
                channels = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and getattr(m.residual_norm, "weight", None) is not None:
                    nn.init.zeros_(m.residual_norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, feature_dim)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64w, H/4, W/4); (B, 64w, H, W) with cifar_stem
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, feature_dim, H/32, W/32)
        return torch.flatten(self.avgpool(x), 1)  # (B, feature_dim)


_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}
ARCHS = choices(Arch)
assert set(_SPECS) == set(ARCHS), "every config.Arch choice needs a spec here"


def build_backbone(arch: str, *, width_mult: float = 1.0, cifar_stem: bool = False,
                   norm_layer: NormLayer | None = None, zero_init_residual: bool = False) -> ResNet:
    """The named ResNet backbone; ``norm_layer(num_features)`` defaults to ``nn.BatchNorm2d``."""
    if arch not in _SPECS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    block, layers = _SPECS[arch]
    return ResNet(block, layers, width_mult=width_mult, cifar_stem=cifar_stem, norm_layer=norm_layer,
                  zero_init_residual=zero_init_residual)
