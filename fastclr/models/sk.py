"""SimCLR v2's selective kernels and the ResNet-D stem and shortcut that come with them.

SimCLR v2 (Chen et al. 2020b, "Big Self-Supervised Models are Strong Semi-Supervised Learners", sec. 2 and
Table 1) widens and deepens the encoder and adds selective kernels (SK; Li et al. 2019, "Selective Kernel Networks")
with ``sk_ratio`` 0.0625. As in the reference code (google-research/simclr ``resnet.py``: ``sk_conv2d``,
``bottleneck_block``, ``resnet_v1_generator``) turning SK on changes three things:

- The block's 3x3 conv outputs 2·width channels, batch-normalized and ReLU'd: two 3x3 paths in one conv (the
  reference uses two 3x3 paths, not SKNet's 3x3 + dilated pair). :class:`SelectiveKernel` fuses them: the paths'
  sum is pooled globally, reduced to max(width·sk_ratio, 32) channels (1x1 conv, BN, ReLU), expanded to 2·width
  logits (1x1 conv) and soft-maxed across the two paths per channel; the output is the weighted sum of the paths.
- The stem is ResNet-D's (He et al. 2019, "Bag of Tricks for Image Classification"): three 3x3 convs (stride 2,
  widths 32w, 32w, 64w) instead of the 7x7, see :func:`deep_stem`.
- Projection shortcuts average-pool before a stride-1 1x1 conv (ResNet-D), see :class:`AvgDown`.

The CIFAR stem (a single 3x3/1 conv) stays as it is with SK, as in the reference.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

NormLayer = Callable[[int], nn.Module]

# The reference's floor on the attention's reduced width: at v2's sk_ratio 1/16 it binds for every block narrower
# than 512 channels (ResNet-50 1×: all 16 blocks; 3×: the first two stages).
SK_MIN_DIM = 32


class SelectiveKernel(nn.Module):
    """Attention over the two paths of a selective-kernel conv: ``(B, 2·width, H, W) -> (B, width, H, W)``.

    The input is the output of one 3x3 conv with 2·width channels (after its BN and ReLU): channels [0, width) are
    path 0, [width, 2·width) path 1. Parameters: ``fc_reduce`` (width → mid, 1x1, no bias), ``bn`` (mid),
    ``fc_select`` (mid → 2·width, 1x1, no bias), mid = max(int(width·sk_ratio), 32), as the reference's
    ``sk_conv2d``.
    """

    def __init__(self, width: int, sk_ratio: float, norm_layer: NormLayer):
        super().__init__()
        if not 0 < sk_ratio <= 1:
            raise ValueError(f"sk_ratio must lie in (0, 1] (SimCLR v2: 0.0625), got {sk_ratio}")
        mid = max(int(width * sk_ratio), SK_MIN_DIM)
        self.width = width
        self.fc_reduce = nn.Conv2d(width, mid, 1, bias=False)
        self.bn = norm_layer(mid)
        self.relu = nn.ReLU(inplace=True)
        self.fc_select = nn.Conv2d(mid, 2 * width, 1, bias=False)

    def forward(self, paths: torch.Tensor) -> torch.Tensor:  # (B, 2w, H, W) -> (B, w, H, W)
        b = paths.shape[0]
        first, second = paths.split(self.width, dim=1)  # views, no copy
        # mean(first + second) = mean(first) + mean(second): pooling the (B, 2w) means avoids a full-size sum.
        pooled = paths.mean((2, 3), keepdim=True)  # (B, 2w, 1, 1)
        pooled = pooled[:, :self.width] + pooled[:, self.width:]  # (B, w, 1, 1)
        logits = self.fc_select(self.relu(self.bn(self.fc_reduce(pooled))))  # (B, 2w, 1, 1)
        weights = logits.view(b, 2, self.width, 1, 1).softmax(dim=1)  # per channel, over the two paths
        return torch.addcmul(first * weights[:, 0], second, weights[:, 1])


def deep_stem(out_channels: int, norm_layer: NormLayer) -> nn.Sequential:
    """ResNet-D's stem without its final norm (the ResNet's ``bn1`` follows): 3x3/2 → 3x3 → 3x3 convs, widths
    out/2, out/2, out, BN + ReLU between. Keys ``0.weight``, ``1.*``, ``3.weight``, ``4.*``, ``6.weight``, as
    timm's ``resnet50d`` names its deep stem."""
    mid = max(1, out_channels // 2)
    return nn.Sequential(
        nn.Conv2d(3, mid, 3, stride=2, padding=1, bias=False), norm_layer(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False), norm_layer(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channels, 3, stride=1, padding=1, bias=False),
    )


class AvgDown(nn.Module):
    """ResNet-D's shortcut pooling: a 2x2 average with the block's stride, as TensorFlow computes it in the
    reference (so its checkpoints convert exactly).

    Stride 2 pads one zero row/column at the bottom/right before a VALID 2x2/2 pool (TF's ``fixed_padding(2)``),
    which only matters on odd maps; stride 1 is TF's 2x2/1 'SAME' pool, which pads bottom/right and leaves the
    padding out of each average. No parameters, so the 1x1 conv and norm after it are ``downsample.1`` and
    ``downsample.2`` (timm's ``avg_down`` names).
    """

    def __init__(self, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"AvgDown supports stride 1 or 2, got {stride}")
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/s, W/s)
        h, w = x.shape[-2:]
        if self.stride == 2:
            if h % 2 or w % 2:
                x = F.pad(x, (0, w % 2, 0, h % 2))
            return F.avg_pool2d(x, 2, stride=2)
        out = F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, stride=1)  # zeros counted: rescale the edges
        # The last row and column averaged 2 real values (the corner 1), not 4.
        scale = torch.ones(h, w, dtype=out.dtype, device=out.device)
        scale[-1, :] *= 2.0
        scale[:, -1] *= 2.0
        return out.mul_(scale)
