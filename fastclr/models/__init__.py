"""Networks: ResNet backbones with torchvision naming, the projection head, the SimCLR wrapper, and export."""
from .export import backbone_state_dict, save_backbone
from .heads import ProjectionHead
from .resnet import ARCHS, BasicBlock, Bottleneck, ResNet, build_backbone
from .simclr import SimCLRModel, build_model

__all__ = ["ARCHS", "BasicBlock", "Bottleneck", "ProjectionHead", "ResNet", "SimCLRModel", "backbone_state_dict",
           "build_backbone", "build_model", "save_backbone"]
