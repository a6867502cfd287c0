"""The supervised network after pretraining: which head layers it keeps, under which names, and what trains."""
import pytest
import torch

from fastclr.config import load_config
from fastclr.models import build_model
from fastclr.models.classifier import classifier_from, head_groups

_TINY = ["model.width_mult=0.125", "model.proj_hidden_dim=24", "model.proj_out_dim=8", "model.proj_layers=3"]


def _model():
    torch.manual_seed(0)
    return build_model(load_config("default", _TINY).model)


def test_head_layers_are_linear_bn_relu_groups():
    groups = head_groups(_model().head)
    assert [[type(m).__name__ for m in g] for g in groups] == [
        ["Linear", "BatchNorm1d", "ReLU"], ["Linear", "BatchNorm1d", "ReLU"], ["Linear", "BatchNorm1d"]]


def test_from_head_layer_1_keeps_the_first_layer_under_its_pretraining_names():
    model = _model()
    zero, one = classifier_from(model, 10, 0), classifier_from(model, 10, 1)
    names0 = {n for n, _ in zero.named_parameters()}
    names1 = {n for n, _ in one.named_parameters()}
    assert names1 - names0 == {"head.mlp.0.weight", "head.mlp.1.weight", "head.mlp.1.bias"}
    assert zero.fc.in_features == model.backbone.feature_dim and one.fc.in_features == 24
    # The kept layer is the pretrained one: a SimCLR state_dict's head.mlp.0/1 tensors load by name.
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("backbone.", "head.mlp.0.", "head.mlp.1."))}
    missing, unexpected = one.load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    x = torch.randn(4, 3, 32, 32)
    model.eval(), one.eval()
    torch.testing.assert_close(one.features(x), model.head.mlp[:3](model.backbone(x)))


def test_the_linear_protocol_trains_fc_only_with_bn_statistics_frozen():
    model = _model()
    clf = classifier_from(model, 10, 0, frozen=True).train()
    assert [n for n, p in clf.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert not clf.backbone.training and clf.fc.training
    before = clf.backbone.bn1.running_mean.clone()
    clf(torch.randn(8, 3, 32, 32)).sum().backward()
    assert torch.equal(clf.backbone.bn1.running_mean, before)
    assert all(p.grad is None for p in clf.backbone.parameters())


def test_zero_init_and_out_of_range_layers():
    model = _model()
    assert classifier_from(model, 10, 3, zero_init=True).fc.weight.abs().sum() == 0
    with pytest.raises(ValueError, match=r"from_head_layer must lie in \[0, 3\]"):
        classifier_from(model, 10, 4)
