import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastclr.models import ProjectionHead, SimCLRModel, build_backbone


def _reference_head(head: ProjectionHead, h: torch.Tensor) -> torch.Tensor:
    """The SimCLR head written out with functional ops from the head's own weights (train-mode BN)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    x = h
    for i, (lin, bn) in enumerate(zip(linears, norms)):
        x = x @ lin.weight.T
        x = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        if i < len(linears) - 1:
            x = F.relu(x)
    return x


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_head_matches_functional_reference_and_shapes(num_layers):
    torch.manual_seed(num_layers)
    head = ProjectionHead(19, 23, 7, num_layers=num_layers).double()
    with torch.no_grad():  # move BN affine parameters off their identity init so the reference sees them
        for m in head.modules():
            if isinstance(m, nn.BatchNorm1d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    h = torch.randn(11, 19, dtype=torch.float64)
    z = head(h)
    assert z.shape == (11, 7)
    torch.testing.assert_close(z, _reference_head(head, h), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_head_structure_follows_simclr(num_layers):
    head = ProjectionHead(16, 32, 8, num_layers=num_layers)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    relus = [m for m in head.modules() if isinstance(m, nn.ReLU)]
    assert len(linears) == len(norms) == num_layers and len(relus) == num_layers - 1
    assert all(lin.bias is None for lin in linears)  # BN replaces the bias
    assert [lin.out_features for lin in linears] == [32] * (num_layers - 1) + [8]
    assert all(bn.affine for bn in norms[:-1])
    assert not norms[-1].affine and norms[-1].weight is None and norms[-1].bias is None
    assert isinstance(list(head.mlp)[-1], nn.BatchNorm1d)  # no ReLU after the output layer
    # The output BN has no parameters: the head owns exactly the linear weights and the hidden BN γ/β.
    expected = 16 * 32 * (num_layers > 1) + 32 * 32 * max(num_layers - 2, 0) + 2 * 32 * (num_layers - 1) \
        + (32 if num_layers > 1 else 16) * 8
    assert sum(p.numel() for p in head.parameters()) == expected


def test_output_is_standardized_per_feature_in_training():
    torch.manual_seed(0)
    z = ProjectionHead(12, 24, 6, num_layers=2)(torch.randn(64, 12) * 5 + 3)
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)


def test_plain_mlp_without_norm_and_factory_without_affine_kwarg():
    plain = ProjectionHead(10, 20, 5, num_layers=2, norm_layer=None)
    assert [type(m) for m in plain.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(m.bias is not None for m in plain.mlp if isinstance(m, nn.Linear))
    # A norm factory that only takes num_features (like the cross-rank BN one) still gets a parameter-free output BN.
    made = ProjectionHead(10, 20, 5, num_layers=3, norm_layer=lambda n: nn.BatchNorm1d(n))
    assert list(made.mlp)[-1].weight is None and list(made.mlp)[-1].running_mean.shape == (5,)
    assert made(torch.randn(4, 10)).shape == (4, 5)


@pytest.mark.parametrize("bad", [dict(num_layers=0), dict(hidden_dim=0), dict(out_dim=-1), dict(num_layers=2.0)])
def test_invalid_arguments_are_refused(bad):
    kwargs = dict(in_dim=8, hidden_dim=8, out_dim=4, num_layers=2) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        ProjectionHead(**kwargs)


def test_simclr_model_forward_is_head_of_features():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", width_mult=0.125, cifar_stem=True)
    model = SimCLRModel(backbone, ProjectionHead(backbone.feature_dim, 16, 8)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = model.features(x)
        assert h.shape == (3, 64)
        torch.testing.assert_close(h, backbone(x))
        torch.testing.assert_close(model(x), model.head(h))
