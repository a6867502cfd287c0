"""ResNet-18/34/50/101/152 backbones (He et al. 2016) whose state_dict keys are torchvision's, minus ``fc``.

The blocks are ResNet v1.5: a Bottleneck strides in its 3x3 conv, not its first 1x1 (the variant torchvision and
NVIDIA's reference ship). Modules are registered in torchvision's order under torchvision's names, so an exported
backbone (width 1, standard stem, no SK) loads into ``torchvision.models.resnet50()`` (or 101, 152) with
``strict=False``, only ``fc`` missing. The forward returns the globally pooled features ``(B, feature_dim)``.

SimCLR v2's big encoders (Chen et al. 2020b, Table 1: up to ResNet-152, 3× wide, selective kernels) are
``width_mult`` and ``sk_ratio``; SK and its ResNet-D stem and shortcuts are in :mod:`fastclr.models.sk`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import Arch, choices
from .sk import AvgDown, SelectiveKernel, deep_stem

NormLayer = Callable[[int], nn.Module]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _downsample(in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer,
                avg_down: bool) -> nn.Module | None:
    """Projection shortcut (1x1 conv + norm; ResNet-D's pool + 1x1 + norm with ``avg_down``) where the identity's
    shape would not match; None where it would."""
    if stride == 1 and in_channels == out_channels:
        return None
    if avg_down:
        return nn.Sequential(AvgDown(stride), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                             norm_layer(out_channels))
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm_layer(out_channels))


def _paths(sk_ratio: float, width: int, norm_layer: NormLayer) -> tuple[int, SelectiveKernel | None]:
    """Output channels of a block's strided 3x3 conv and the SK attention fusing them: (2·width, SK) or (width,
    None)."""
    if sk_ratio > 0:
        return 2 * width, SelectiveKernel(width, sk_ratio, norm_layer)
    return width, None


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). With SK the first (strided) one carries the two paths, as the Bottleneck's
    3x3 does; the reference code has no SK in basic blocks (ResNet-D shortcuts only), so this is an extension."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, norm_layer: NormLayer, sk_ratio: float = 0.0):
        super().__init__()
        paths, sk = _paths(sk_ratio, width, norm_layer)
        self.conv1 = _conv3x3(in_channels, paths, stride)
        self.bn1 = norm_layer(paths)
        self.sk = sk
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = norm_layer(width)
        self.downsample = _downsample(in_channels, width, stride, norm_layer, sk_ratio > 0)

    @property
    def residual_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, width, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, width or 2·width with SK, H/s, W/s)
        if self.sk is not None:
            out = self.sk(out)
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce → 3x3 (carries the stride: v1.5; two paths + SK attention with SK) → 1x1 expand ×4
    (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, norm_layer: NormLayer, sk_ratio: float = 0.0):
        super().__init__()
        out_channels = width * self.expansion
        paths, sk = _paths(sk_ratio, width, norm_layer)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, paths, stride)
        self.bn2 = norm_layer(paths)
        self.sk = sk
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride, norm_layer, sk_ratio > 0)

    @property
    def residual_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, 4·width, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))  # (B, width or 2·width with SK, H/s, W/s)
        if self.sk is not None:
            out = self.sk(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet ResNet without the classifier; ``feature_dim`` is the width of the pooled output.

    ``width_mult`` scales every stage (64·w, 128·w, 256·w, 512·w channels, rounded, at least 1); ``cifar_stem``
    replaces the 7x7/2 conv + max-pool by a 3x3/1 conv for 32-px images (SimCLR's CIFAR-10 variant, Chen et al.
    2020, appendix B.9), of stride ``stem_stride`` (2: every map halved, a quarter of the FLOPs at equal width); ``zero_init_residual`` starts every block as the identity (Goyal et al. 2017);
    ``sk_ratio`` > 0 adds SimCLR v2's selective kernels with ResNet-D's stem and shortcuts (module sk.py).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], *,
                 width_mult: float = 1.0, cifar_stem: bool = False, norm_layer: NormLayer | None = None,
                 zero_init_residual: bool = False, sk_ratio: float = 0.0, stem_stride: int = 1):
        super().__init__()
        if stem_stride not in (1, 2) or (stem_stride != 1 and not cifar_stem):
            raise ValueError(f"stem_stride must be 1 or 2, and 2 only with cifar_stem, got {stem_stride}")
        if not width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        if not 0 <= sk_ratio <= 1:
            raise ValueError(f"sk_ratio must lie in [0, 1] (0 = off, SimCLR v2: 0.0625), got {sk_ratio}")
        norm_layer = norm_layer or nn.BatchNorm2d
        widths = [max(1, int(round(c * width_mult))) for c in (64, 128, 256, 512)]
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1, bias=False)
        elif sk_ratio > 0:
            self.conv1 = deep_stem(widths[0], norm_layer)
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
                blocks.append(block(channels, width, stride, norm_layer, sk_ratio))
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

    def stem(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 64w, H/4, W/4); H/s, W/s with cifar_stem
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, feature_dim)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, feature_dim, H/32, W/32)
        return torch.flatten(self.avgpool(x), 1)  # (B, feature_dim)


_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}
ARCHS = choices(Arch)
assert set(_SPECS) == set(ARCHS), "every config.Arch choice needs a spec here"


def build_backbone(arch: str, *, width_mult: float = 1.0, cifar_stem: bool = False,
                   norm_layer: NormLayer | None = None, zero_init_residual: bool = False,
                   sk_ratio: float = 0.0, stem_stride: int = 1) -> ResNet:
    """The named ResNet backbone; ``norm_layer(num_features)`` defaults to ``nn.BatchNorm2d``."""
    if arch not in _SPECS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    block, layers = _SPECS[arch]
    return ResNet(block, layers, width_mult=width_mult, cifar_stem=cifar_stem, norm_layer=norm_layer,
                  zero_init_residual=zero_init_residual, sk_ratio=sk_ratio, stem_stride=stem_stride)
