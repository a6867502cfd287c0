"""The checkpoint module on its own: run state, RNG streams, resume compatibility, atomic files."""
import random

import numpy as np
import pytest
import torch

from fastclr import atomic, checkpoint
from fastclr.checkpoint import RunState
from fastclr.config import ConfigError, check_resume_compatible, load_config, to_dict


def test_run_state_round_trips_through_the_client_state():
    cfg = load_config(None, ["train.epochs=3"])
    state = RunState(step=17, nonfinite_steps=2)
    client = state.to_client(cfg, world_size=4, steps_per_epoch=5)
    assert client["epoch"] == 3 and client["world_size"] == 4 and client["config"] == to_dict(cfg)
    assert RunState.from_client(client) == state
    assert RunState.from_client({"step": 3}) == RunState(step=3)  # older checkpoints lack the newer fields


def test_rng_state_restores_every_stream():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = checkpoint.rng_state()
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(saved)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_resume_refuses_another_model_naming_the_field():
    saved = to_dict(load_config(None, ["model.arch=resnet50"]))
    with pytest.raises(ConfigError, match="'model.arch'.*trained with arch='resnet50'.*'resnet18'"):
        check_resume_compatible(saved, load_config(None, []), "ckpt/step1")
    check_resume_compatible(saved, load_config(None, ["model.arch=resnet50", "optim.base_lr=2"]), "ckpt/step1")
    check_resume_compatible({}, load_config(None, []), "ckpt/old")  # no config saved: nothing to compare


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic.write_bytes(str(path), b"old")
    atomic.write_bytes(str(path), b"new content")
    assert path.read_bytes() == b"new content"
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]
    atomic.torch_save({"x": torch.arange(3)}, str(tmp_path / "t.pt"))
    assert torch.equal(torch.load(tmp_path / "t.pt")["x"], torch.arange(3))


def test_resolve_names_what_is_not_a_checkpoint(tmp_path):
    assert checkpoint.resolve(str(tmp_path), "auto") is None
    assert checkpoint.resolve(str(tmp_path), "none") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve(str(tmp_path), "step000000003")
