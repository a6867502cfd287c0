import math

import pytest
import torch
from torch import nn

from fastclr.models import ARCHS, Bottleneck, ProjectionHead, SimCLRModel, build_backbone

# Widths of the pooled output: 512·w (BasicBlock) or 2048·w (Bottleneck), with 512·w rounded first.
EXPECTED_DIM = {
    ("resnet18", 1.0): 512, ("resnet18", 0.25): 128, ("resnet18", 0.1): 51,
    ("resnet34", 1.0): 512, ("resnet34", 0.25): 128, ("resnet34", 0.1): 51,
    ("resnet50", 1.0): 2048, ("resnet50", 0.25): 512, ("resnet50", 0.1): 204,
    ("resnet101", 1.0): 2048, ("resnet101", 0.25): 512, ("resnet101", 0.1): 204,
    ("resnet152", 1.0): 2048, ("resnet152", 0.25): 512, ("resnet152", 0.1): 204,
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cifar_stem", [False, True])
@pytest.mark.parametrize("width_mult", [1.0, 0.25, 0.1])
def test_output_shape_for_each_arch_stem_and_width(arch, cifar_stem, width_mult):
    torch.manual_seed(0)
    model = build_backbone(arch, width_mult=width_mult, cifar_stem=cifar_stem).eval()
    assert model.feature_dim == EXPECTED_DIM[(arch, width_mult)]
    assert model.conv1.kernel_size == ((3, 3) if cifar_stem else (7, 7))
    assert model.conv1.stride == ((1, 1) if cifar_stem else (2, 2))
    x = torch.randn(2, 3, 32, 37) if cifar_stem else torch.randn(2, 3, 45, 33)  # odd sizes on purpose
    with torch.no_grad():
        h = model(x)
    assert h.shape == (2, EXPECTED_DIM[(arch, width_mult)])
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("arch,count", [("resnet18", 11_176_512), ("resnet34", 21_284_672),
                                        ("resnet50", 23_508_032), ("resnet101", 42_500_160),
                                        ("resnet152", 58_143_808)])
def test_parameter_count_equals_torchvision_minus_fc(arch, count):
    # torchvision: 11,689,512 / 21,797,672 / 25,557,032 / 44,549,160 / 60,192,808 parameters, fc = 512·1000+1000
    # or 2048·1000+1000.
    model = build_backbone(arch)
    assert sum(p.numel() for p in model.parameters()) == count
    assert not any(name.startswith("fc.") for name in model.state_dict())


def test_v15_stride_sits_on_the_3x3_conv():
    r50 = build_backbone("resnet50", width_mult=0.125)
    for stage in (2, 3, 4):
        block = getattr(r50, f"layer{stage}")[0]
        assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.conv3.stride == (1, 1)
        assert block.downsample[0].stride == (2, 2)
    assert r50.layer1[0].downsample is not None  # 64 -> 256 channels even without a stride
    r18 = build_backbone("resnet18", width_mult=0.125)
    assert r18.layer1[0].downsample is None and r18.layer2[0].conv1.stride == (2, 2)


def test_tiny_width_rounds_every_stage_to_at_least_one_channel():
    model = build_backbone("resnet50", width_mult=1e-3)
    assert model.conv1.out_channels == 1 and model.feature_dim == 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="width_mult"):
        build_backbone("resnet18", width_mult=0.0)


def test_unknown_arch_names_the_bad_value_and_the_valid_ones():
    with pytest.raises(ValueError) as err:
        build_backbone("resnet200")
    msg = str(err.value)
    assert "resnet200" in msg and all(a in msg for a in ARCHS)


def test_norm_layer_is_used_for_every_normalization():
    made = []

    def norm(c):
        made.append(c)
        return nn.GroupNorm(1, c)

    model = build_backbone("resnet18", width_mult=0.25, norm_layer=norm)
    # stem + 2 per block x 8 blocks + 3 downsample shortcuts
    assert len(made) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_kaiming_fan_out_init_and_unit_bn():
    torch.manual_seed(0)
    model = build_backbone("resnet18")
    w = model.layer4[1].conv2.weight  # (512, 512, 3, 3): fan_out = 512·9
    assert w.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)
    assert abs(w.mean().item()) < 1e-3
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_makes_every_block_start_as_identity(arch):
    model = build_backbone(arch, width_mult=0.25, zero_init_residual=True).eval()
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
            assert torch.count_nonzero(last.weight) == 0
            if block.downsample is None:
                c = block.conv1.in_channels
                x = torch.rand(2, c, 5, 7)  # non-negative, as a previous ReLU leaves it
                with torch.no_grad():
                    torch.testing.assert_close(block(x), x)
    assert torch.count_nonzero(build_backbone(arch, width_mult=0.25).layer1[0].bn1.weight) > 0


def _small_simclr(arch, cifar_stem, sk_ratio=0.0):
    backbone = build_backbone(arch, width_mult=0.125, cifar_stem=cifar_stem, sk_ratio=sk_ratio)
    return SimCLRModel(backbone, ProjectionHead(backbone.feature_dim, 32, 16, num_layers=3))


@pytest.mark.parametrize("arch,cifar_stem,size,sk_ratio", [("resnet18", True, 32, 0.0), ("resnet50", False, 64, 0.0),
                                                           ("resnet50", False, 64, 0.0625),
                                                           ("resnet18", True, 32, 0.0625)])
def test_channels_last_is_kept_through_every_layer(arch, cifar_stem, size, sk_ratio):
    torch.manual_seed(0)
    # fp64 so that the comparison with the NCHW model at the end is not blurred by rounding that train-mode BN
    # over a tiny batch would amplify.
    model = _small_simclr(arch, cifar_stem, sk_ratio).double()
    reference = _small_simclr(arch, cifar_stem, sk_ratio).double()
    reference.load_state_dict(model.state_dict())
    model = model.to(memory_format=torch.channels_last)
    seen, bad = [], []

    def check(module, inputs, output):
        for t in (*inputs, output):
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                seen.append(type(module).__name__)
                if not t.is_contiguous(memory_format=torch.channels_last):
                    bad.append((type(module).__name__, tuple(t.shape), t.stride()))

    for m in model.modules():
        if not isinstance(m, (nn.Sequential, SimCLRModel)):
            m.register_forward_hook(check)
    x = torch.randn(4, 3, size, size + 3, dtype=torch.float64)
    z = model(x.contiguous(memory_format=torch.channels_last))
    assert not bad, f"layout conversions: {bad[:5]}"
    assert {"Conv2d", "BatchNorm2d", "ReLU"} <= set(seen)
    for p in model.parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
    # Same weights, same math: the layout must not change the result.
    torch.testing.assert_close(z, reference(x), rtol=1e-9, atol=1e-9)


def test_bf16_autocast_keeps_bn_parameters_and_statistics_fp32():
    torch.manual_seed(0)
    model = _small_simclr("resnet18", True).to(memory_format=torch.channels_last).train()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    before = [m.running_mean.clone() for m in bns]
    conv_dtypes = set()
    model.backbone.layer2[0].conv1.register_forward_hook(lambda m, i, o: conv_dtypes.add(o.dtype))
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model(x)
        loss = z.float().pow(2).mean() + model.features(x).float().mean()
    loss.backward()
    assert conv_dtypes == {torch.bfloat16}  # autocast really ran the convs in bf16
    for m, rm0 in zip(bns, before):
        for t in (m.running_mean, m.running_var):
            assert t.dtype == torch.float32 and torch.isfinite(t).all()
        assert not torch.equal(m.running_mean, rm0)  # statistics were updated (in fp32)
        if m.affine:
            for p in (m.weight, m.bias):
                assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_stride_two_cifar_stem_halves_every_map_and_keeps_the_parameters():
    from fastclr.config import ConfigError, load_config

    x = torch.randn(3, 3, 32, 32)
    maps = {}
    for stride in (1, 2):
        torch.manual_seed(0)
        net = build_backbone("resnet18", width_mult=0.125, cifar_stem=True, stem_stride=stride).eval()
        maps[stride] = net.layer4(net.layer3(net.layer2(net.layer1(net.relu(net.bn1(net.conv1(x))))))).shape
        maps[f"params{stride}"] = sum(p.numel() for p in net.parameters())
    assert maps[1][-1] == 4 and maps[2][-1] == 2 and maps[1][:2] == maps[2][:2]
    assert maps["params1"] == maps["params2"]
    with pytest.raises(ValueError, match="stem_stride"):
        build_backbone("resnet18", stem_stride=2)  # the ImageNet stem has its own strides
    with pytest.raises(ConfigError, match="model.stem_stride"):
        load_config(None, ["model.stem_stride=2", "model.cifar_stem=false"])
