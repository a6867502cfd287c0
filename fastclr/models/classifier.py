"""The supervised network of the steps after pretraining: backbone, the first k layers of the projection head, and a
new linear classifier.

SimCLR v2 (Chen et al. 2020b, sec. 2, "fine-tuning"): instead of throwing the head g(·) away, fine-tune from a
middle layer of it — the classifier sits on the output of head layer k (k = 0: on the backbone features, SimCLR v1;
v2 uses k = 1 of its 3-layer head for 1% and 10% labels). Head layer i is the i-th Linear(→BN→ReLU) group of
:class:`fastclr.models.heads.ProjectionHead`, as the reference selects ``hiddens_list[ft_proj_selector]``
(google-research/simclr ``tf2/model.py``). The kept layers keep their pretraining names (``head.mlp.*``) so a
checkpoint's tensors load by name; the classifier is ``fc`` (torchvision's name for it).

With ``frozen=True`` (the linear protocol) backbone and kept head run in eval mode under ``no_grad`` whatever mode
the module is put in: BN uses its running statistics and nothing but ``fc`` is trained.
"""
from __future__ import annotations

import torch
from torch import nn


def head_groups(head: nn.Module) -> list[list[nn.Module]]:
    """The layers of a projection head's ``mlp``: each group starts at a Linear and runs up to the next one."""
    groups: list[list[nn.Module]] = []
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            groups.append([])
        if not groups:
            raise ValueError("a projection head's mlp must start with a Linear layer")
        groups[-1].append(m)
    return groups


def truncated_head(head: nn.Module, layers: int) -> nn.Module:
    """The first ``layers`` layers of ``head`` (its modules, not copies) under the same names: ``mlp.0``, ``mlp.1``,
    … so that ``head.mlp.<i>.*`` tensors of a checkpoint load into it. An empty head is the identity."""
    groups = head_groups(head)
    if not 0 <= layers <= len(groups):
        raise ValueError(f"from_head_layer must lie in [0, {len(groups)}] for a {len(groups)}-layer projection "
                         f"head, got {layers}")
    return empty_head(*[m for group in groups[:layers] for m in group])


def empty_head(*modules: nn.Module) -> nn.Module:
    """A module whose ``mlp`` runs ``modules`` (none: the identity, a classifier on the backbone features)."""
    kept = nn.Module()
    kept.mlp = nn.Sequential(*modules)
    return kept


def head_out_dim(head: nn.Module, layers: int, feature_dim: int) -> int:
    """Width of the output of head layer ``layers`` (``feature_dim`` for 0)."""
    return head_groups(head)[layers - 1][0].out_features if layers else feature_dim


class Classifier(nn.Module):
    """logits = fc(head[:k](backbone(x))). ``features`` is what ``fc`` sees (the kNN/probe input of eval)."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None, num_classes: int, *, in_dim: int,
                 frozen: bool = False, zero_init: bool = False, seed: int = 0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.backbone = backbone
        self.head = head if head is not None else empty_head()
        self.fc = nn.Linear(in_dim, num_classes)
        self.frozen = frozen
        if zero_init:
            nn.init.zeros_(self.fc.weight)
        else:  # the reference's RandomNormal(stddev=0.01), from its own seed: the same on every rank and every run
            nn.init.normal_(self.fc.weight, std=0.01, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(self.fc.bias)
        if frozen:
            self.backbone.requires_grad_(False)
            self.head.requires_grad_(False)
            self.train(True)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # the linear protocol: BN statistics stay the pretrained ones
            self.backbone.eval()
            self.head.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, in_dim)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.head.mlp(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        return self.fc(self.features(x))


def classifier_from(model: nn.Module, num_classes: int, head_layers: int, *, frozen: bool = False,
                    zero_init: bool = False, seed: int = 0) -> Classifier:
    """A :class:`Classifier` on a :class:`fastclr.models.SimCLRModel`'s modules (shared, not copied): its backbone
    and the first ``head_layers`` layers of its head."""
    head = truncated_head(model.head, head_layers)
    in_dim = head_out_dim(model.head, head_layers, model.backbone.feature_dim)
    return Classifier(model.backbone, head, num_classes, in_dim=in_dim, frozen=frozen, zero_init=zero_init,
                      seed=seed)
