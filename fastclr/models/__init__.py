"""Networks: ResNet backbones with torchvision naming, the projection head, the SimCLR wrapper (writing them out:
:mod:`fastclr.export`)."""
from .heads import ProjectionHead
from .resnet import ARCHS, BasicBlock, Bottleneck, ResNet, build_backbone
from .simclr import SimCLRModel, build_model

__all__ = ["ARCHS", "BasicBlock", "Bottleneck", "ProjectionHead", "ResNet", "SimCLRModel", "build_backbone",
           "build_model"]
