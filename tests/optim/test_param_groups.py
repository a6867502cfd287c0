import pytest
import torch
from torch import nn

from fastclr.models import ProjectionHead, SimCLRModel, build_backbone
from fastclr.optim import LARS, excluded_names, param_groups


def _model(norm_layer=nn.BatchNorm1d):
    backbone = build_backbone("resnet18", width_mult=0.25)
    head = ProjectionHead(backbone.feature_dim, 64, 32, num_layers=3, norm_layer=norm_layer)
    return SimCLRModel(backbone, head)


@pytest.mark.parametrize("head_norm", [nn.BatchNorm1d, None])
def test_bn_and_biases_excluded_conv_and_linear_weights_included(head_norm):
    model = _model(head_norm)
    groups = param_groups(model, 1e-6)
    decay = {id(p) for g in groups if g["lars"] for p in g["params"]}
    excluded = {id(p) for g in groups if not g["lars"] for p in g["params"]}
    assert not decay & excluded
    assert decay | excluded == {id(p) for p in model.parameters()}
    # Classify by module type, independently of the shape rule used by param_groups.
    n_bn = n_bias = n_weight = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters(recurse=False):
                assert id(p) in excluded
                n_bn += 1
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            assert id(m.weight) in decay
            n_weight += 1
            if m.bias is not None:
                assert id(m.bias) in excluded
                n_bias += 1
    assert n_bn > 0 and n_weight == 20 + 3 and (n_bias == 3) == (head_norm is None)
    for g in groups:
        assert g["weight_decay"] == (1e-6 if g["lars"] else 0.0)
    names = excluded_names(model)
    assert len(names) == len(excluded)
    assert all(n.endswith((".weight", ".bias")) and (".bn" in n or "downsample.1" in n or n.startswith("bn1")
                                                   or n.startswith("head.")) for n in names)
    assert "backbone.bn1.weight" in names and "backbone.layer3.0.downsample.1.bias" in names
    assert not any(n.endswith("conv1.weight") or n.endswith("downsample.0.weight") for n in names)


def test_frozen_parameters_and_empty_groups_are_left_out():
    lin = nn.Linear(3, 4, bias=False)
    assert [len(g["params"]) for g in param_groups(lin, 0.1)] == [1]
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    assert [(g["lars"], len(g["params"])) for g in groups] == [(True, 1), (False, 2)]
    assert excluded_names(model) == ["0.bias", "1.bias"]
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)


def test_lars_on_these_groups_decays_weights_only():
    torch.manual_seed(0)
    model = _model()
    bn = model.backbone.layer2[0].bn1
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LARS(param_groups(model, 0.1), lr=1.0, momentum=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only weight decay can move anything
    opt.step()
    excluded = set(excluded_names(model))
    for n, p in model.named_parameters():
        if n in excluded:
            assert torch.equal(p.detach(), before[n]), n
        else:
            # zero gradient: g' = wd·w, trust = η‖w‖/‖wd·w‖ = η/wd, so w shrinks by the factor 1 − η
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.001), rtol=1e-6, atol=1e-7)
