import os

import pytest
import torch
from torch import nn

from fastclr import export as export_module
from fastclr.export import backbone_state_dict, save_backbone
from fastclr.models import ProjectionHead, SimCLRModel, build_backbone

# torchvision.models.resnet50().state_dict() keys, in order, minus fc.weight / fc.bias. Per module: parameters, then
# buffers; modules in registration order (conv1, bn1, conv2, bn2, conv3, bn3, downsample.0, downsample.1).
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_bn(prefix, conv, bn):
    return [f"{prefix}{conv}.weight"] + [f"{prefix}{bn}.{s}" for s in _BN]


def _bottleneck_keys(layers):
    """torchvision's Bottleneck ResNet keys (resnet50/101/152 differ only in blocks per stage), minus fc."""
    return _conv_bn("", "conv1", "bn1") + [
        key
        for stage, blocks in zip(("layer1", "layer2", "layer3", "layer4"), layers)
        for b in range(blocks)
        for key in (_conv_bn(f"{stage}.{b}.", "conv1", "bn1") + _conv_bn(f"{stage}.{b}.", "conv2", "bn2")
                    + _conv_bn(f"{stage}.{b}.", "conv3", "bn3")
                    + (_conv_bn(f"{stage}.{b}.downsample.", "0", "1") if b == 0 else []))
    ]


RESNET50_KEYS = _bottleneck_keys((3, 4, 6, 3))
RESNET101_KEYS = _bottleneck_keys((3, 4, 23, 3))
RESNET152_KEYS = _bottleneck_keys((3, 8, 36, 3))

# The stem and the first block written out in full, pinning the order the compact form above expands to.
RESNET50_HEAD_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.bn1.running_mean",
    "layer1.0.bn1.running_var", "layer1.0.bn1.num_batches_tracked",
    "layer1.0.conv2.weight", "layer1.0.bn2.weight", "layer1.0.bn2.bias", "layer1.0.bn2.running_mean",
    "layer1.0.bn2.running_var", "layer1.0.bn2.num_batches_tracked",
    "layer1.0.conv3.weight", "layer1.0.bn3.weight", "layer1.0.bn3.bias", "layer1.0.bn3.running_mean",
    "layer1.0.bn3.running_var", "layer1.0.bn3.num_batches_tracked",
    "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight", "layer1.0.downsample.1.bias",
    "layer1.0.downsample.1.running_mean", "layer1.0.downsample.1.running_var",
    "layer1.0.downsample.1.num_batches_tracked",
    "layer1.1.conv1.weight",
]
RESNET50_TAIL_KEYS = ["layer4.2.bn3.weight", "layer4.2.bn3.bias", "layer4.2.bn3.running_mean",
                      "layer4.2.bn3.running_var", "layer4.2.bn3.num_batches_tracked"]

# The SK backbone's stem and first block written out in full (key names documented in fastclr/export.py):
# ResNet-D stem as timm's resnet50d, the 3x3's two paths under torchvision's conv2/bn2, the attention under sk.,
# the pooled shortcut's conv and BN at downsample.1/.2.
_BN_KEYS = lambda p: [f"{p}.{s}" for s in _BN]  # noqa: E731
RESNET50_SK_HEAD_KEYS = (
    ["conv1.0.weight"] + _BN_KEYS("conv1.1") + ["conv1.3.weight"] + _BN_KEYS("conv1.4") + ["conv1.6.weight"]
    + _BN_KEYS("bn1")
    + ["layer1.0.conv1.weight"] + _BN_KEYS("layer1.0.bn1") + ["layer1.0.conv2.weight"] + _BN_KEYS("layer1.0.bn2")
    + ["layer1.0.sk.fc_reduce.weight"] + _BN_KEYS("layer1.0.sk.bn") + ["layer1.0.sk.fc_select.weight"]
    + ["layer1.0.conv3.weight"] + _BN_KEYS("layer1.0.bn3")
    + ["layer1.0.downsample.1.weight"] + _BN_KEYS("layer1.0.downsample.2")
    + ["layer1.1.conv1.weight"]
)


class _Wrapper(nn.Module):
    """Stands in for DDP / the DeepSpeed engine: the real model under ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def _simclr(arch="resnet50", width_mult=1.0, sk_ratio=0.0):
    backbone = build_backbone(arch, width_mult=width_mult, sk_ratio=sk_ratio)
    return SimCLRModel(backbone, ProjectionHead(backbone.feature_dim, 64, 16))


def test_resnet50_export_has_exactly_torchvision_keys():
    assert len(RESNET50_KEYS) == 320 - 2  # torchvision's resnet50 state_dict has 320 entries incl. fc.weight/bias
    assert RESNET50_KEYS[:len(RESNET50_HEAD_KEYS)] == RESNET50_HEAD_KEYS
    assert RESNET50_KEYS[-len(RESNET50_TAIL_KEYS):] == RESNET50_TAIL_KEYS
    for model in (_simclr(), _Wrapper(_simclr()), build_backbone("resnet50")):
        state = backbone_state_dict(model)
        assert list(state) == RESNET50_KEYS


@pytest.mark.parametrize("arch,keys,entries", [("resnet101", RESNET101_KEYS, 626), ("resnet152", RESNET152_KEYS, 932)])
def test_deep_resnet_exports_have_exactly_torchvision_keys(arch, keys, entries):
    # torchvision's resnet101 / resnet152 state_dicts: 626 / 932 entries including fc.weight and fc.bias.
    assert len(keys) == entries - 2 and len(set(keys)) == len(keys)
    assert keys[:len(RESNET50_HEAD_KEYS)] == RESNET50_HEAD_KEYS and keys[-len(RESNET50_TAIL_KEYS):] == \
        RESNET50_TAIL_KEYS
    model = _simclr(arch, width_mult=0.0625)  # the names do not depend on the width
    assert list(backbone_state_dict(_Wrapper(model))) == keys


def test_sk_export_keys_are_the_documented_ones():
    state = backbone_state_dict(_simclr("resnet50", width_mult=0.25, sk_ratio=0.0625))
    keys = list(state)
    assert keys[:len(RESNET50_SK_HEAD_KEYS)] == RESNET50_SK_HEAD_KEYS
    assert "conv1.weight" not in state and not any(k.endswith("downsample.0.weight") for k in keys)
    # 16 blocks, each with one attention: two 1x1 conv weights and a BN's five entries; the paths doubled in conv2.
    assert sum(k.split(".")[2] == "sk" for k in keys if k.startswith("layer")) == 16 * 7
    assert state["layer1.0.conv2.weight"].shape == (32, 16, 3, 3)
    assert state["layer1.0.sk.fc_reduce.weight"].shape == (32, 16, 1, 1)
    assert state["layer1.0.sk.fc_select.weight"].shape == (32, 32, 1, 1)


def test_exported_tensors_are_plain_fp32_cpu_copies():
    torch.manual_seed(0)
    model = _Wrapper(_simclr("resnet18", 0.25)).to(memory_format=torch.channels_last)
    model.module.backbone.bn1.running_mean.normal_()
    state = backbone_state_dict(model)
    own = model.module.backbone.state_dict()
    assert list(state) == list(own)
    for k, v in state.items():
        assert v.device.type == "cpu" and not v.requires_grad and v.is_contiguous()
        assert v.dtype == (torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
        assert torch.equal(v, own[k])
        assert v.data_ptr() != own[k].data_ptr()
    state["conv1.weight"].zero_()  # a copy: the model is untouched
    assert model.module.backbone.conv1.weight.abs().sum() > 0


def test_export_casts_low_precision_to_fp32_and_strips_compile_prefix():
    backbone = build_backbone("resnet18", width_mult=0.125)
    model = SimCLRModel(backbone, ProjectionHead(64, 16, 8)).to(torch.bfloat16)
    model.backbone = type("Compiled", (nn.Module,), {})()  # mimic torch.compile's OptimizedModule wrapper
    model.backbone._orig_mod = backbone
    state = backbone_state_dict(model)
    assert "conv1.weight" in state and not any("head" in k or "_orig_mod" in k for k in state)
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    torch.testing.assert_close(state["conv1.weight"], backbone.conv1.weight.float())


def test_saved_file_round_trips_into_a_fresh_backbone(tmp_path):
    torch.manual_seed(0)
    model = _simclr("resnet18", 0.25)
    model.train()(torch.randn(4, 3, 32, 32))  # move BN statistics away from their init
    path = save_backbone(_Wrapper(model), tmp_path / "sub" / "backbone.pt")
    assert os.listdir(tmp_path / "sub") == ["backbone.pt"]  # no temp file left behind
    fresh = build_backbone("resnet18", width_mult=0.25)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), model.backbone.eval()(x))


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "backbone.pt"
    save_backbone(build_backbone("resnet18", width_mult=0.125), path)
    good = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_backbone(build_backbone("resnet18", width_mult=0.25), path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["backbone.pt"]


def test_model_without_backbone_parameters_is_refused():
    with pytest.raises(ValueError, match="no backbone parameters"):
        backbone_state_dict(nn.Module())
