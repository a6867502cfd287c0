import os

import pytest

from fastclr.config import (Config, ConfigError, batch_plan, deepspeed_config, load_config, to_dict, validate_run)

from tests.helpers import RECIPES


@pytest.mark.parametrize("name", sorted(os.listdir(RECIPES)))
def test_every_recipe_loads_and_holds_no_machine_path(name):
    """A recipe travels between machines: where the data lies is given on the command line. One that needs data
    and is loaded without it fails before any compute, naming data.path and showing an example."""
    import yaml

    with open(os.path.join(RECIPES, name)) as f:
        data = (yaml.safe_load(f) or {}).get("data") or {}
    assert not {"path", "eval_path", "exclude"} & set(data), f"{name} holds a data location: {data}"
    try:
        cfg = load_config(os.path.join(RECIPES, name))
    except ConfigError as e:
        assert "'data.path'" in str(e) and "e.g. 'data.path=/data/imagenet/train-{" in str(e), e
        cfg = load_config(os.path.join(RECIPES, name), ["data.path=/data/train", "data.eval_path=/data/val"])
    assert isinstance(cfg, Config)


def test_overrides_are_typed_and_applied_after_the_recipe():
    cfg = load_config(os.path.join(RECIPES, "default.yaml"),
                      ["model.arch=resnet50", "optim.base_lr=0.5", "train.epochs=3", "precision.channels_last=false",
                       "data.augment.crop_area=[0.2,1.0]"])
    assert cfg.model.arch == "resnet50" and cfg.optim.base_lr == 0.5 and cfg.train.epochs == 3.0
    assert cfg.precision.channels_last is False
    assert cfg.data.augment.crop_area == (0.2, 1.0)
    assert cfg.data.dataset == "digits"  # untouched recipe value


@pytest.mark.parametrize("override, field", [
    ("model.arch=resnet51", "model.arch"),
    ("loss.temperature=-0.1", "loss.temperature"),
    ("loss.temperature=0", "loss.temperature"),
    ("loss.impl=cuda", "loss.impl"),
    ("optim.lr_scaling=cubic", "optim.lr_scaling"),
    ("data.augment.flip_p=1.5", "data.augment.flip_p"),
    ("data.augment.crop_area=[0.9,0.1]", "data.augment.crop_area"),
    ("data.dataset=imagenet", "data.dataset"),
    ("data.dataset=folder", "data.path"),
    ("train.epochs=0", "train.epochs"),
    ("train.global_batch_size=abc", "train.global_batch_size"),
    ("model.nope=1", "model.nope"),
    ("precision.dtype=fp8", "precision.dtype"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_config(None, [override])


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/recipe.yaml")


def test_batch_arithmetic_has_one_source():
    cfg = load_config(None, ["train.global_batch_size=4096", "train.micro_batch_size=256", "precision.dtype=bf16"])
    plan = batch_plan(cfg, world_size=8)
    assert (plan.global_batch, plan.micro_batch, plan.accumulation) == (4096, 256, 2)
    ds = deepspeed_config(cfg, plan)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8
    assert ds["zero_optimization"]["stage"] == 0
    assert "bf16" not in ds and "fp16" not in ds  # autocast, never whole-module casting (BN stays fp32)
    assert ds["torch_autocast"]["dtype"] == "bfloat16"


def test_auto_precision_follows_the_hardware(monkeypatch):
    import torch

    from fastclr.config.run import precision_name

    cfg = load_config(None, [])
    assert cfg.precision.dtype == "auto"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert precision_name(cfg, cuda=False) == expected
        ds = deepspeed_config(cfg, batch_plan(cfg, world_size=1))
        assert ds.get("torch_autocast", {}).get("dtype") == ("bfloat16" if native else None)
    for bf16_gpu, expected in ((True, "bf16"), (False, "fp16")):  # Ampere and later; Volta/Turing
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_gpu)
        assert precision_name(cfg, cuda=True) == expected
    assert precision_name(load_config(None, ["precision.dtype=bf16"]), cuda=False) == "bf16"  # asked for: obeyed


def test_world_dependent_checks():
    with pytest.raises(ConfigError, match="'train.global_batch_size'.*not divisible by the world size 3"):
        validate_run(load_config(None, ["train.global_batch_size=256"]), world_size=3, cuda=False)
    with pytest.raises(ConfigError, match="'train.micro_batch_size'"):
        validate_run(load_config(None, ["train.global_batch_size=256", "train.micro_batch_size=48"]), 2, False)
    with pytest.raises(ConfigError, match="'precision.dtype'.*fp16 needs a CUDA"):
        validate_run(load_config(None, ["precision.dtype=fp16"]), 1, cuda=False)
    with pytest.raises(ConfigError, match="'distributed.zero_stage'.*LARS"):
        validate_run(load_config(None, ["distributed.zero_stage=2"]), 1, cuda=False)
    with pytest.raises(ConfigError, match="'distributed.bn_group_size'.*does not divide"):
        validate_run(load_config(None, ["distributed.bn_group_size=3", "train.global_batch_size=256"]), 4, False)


def test_to_dict_round_trips():
    cfg = load_config(os.path.join(RECIPES, "imagenet_resnet50_bs4096.yaml"), ["data.path=/data/imagenet/train"])
    d = to_dict(cfg)
    import yaml
    again = load_config(None, [])
    from fastclr.config import from_dict
    again = from_dict(Config, yaml.safe_load(yaml.safe_dump(d)))
    assert again == cfg
