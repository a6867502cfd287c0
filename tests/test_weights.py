"""Safe reading of checkpoints, backbones and classifiers, and the export as state_dict + safetensors."""
import json
import os

import pytest
import torch

from fastclr.checkpoint import COMPLETE
from fastclr.config import load_config, to_dict
from fastclr.models import ProjectionHead, build_backbone, build_model
from fastclr.export import export, save_classifier
from fastclr.weights import MODEL_STATES, UnsafeFileError, load_file, load_weights

_TINY = ["model.width_mult=0.125", "model.proj_hidden_dim=24", "model.proj_out_dim=8", "model.proj_layers=3"]


class Hostile:
    """Unpickling this calls os.makedirs(marker): code from the file runs unless the loader refuses objects."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def hostile_file(path, marker) -> str:
    torch.save({"module": {"backbone.conv1.weight": torch.zeros(1)}, "payload": Hostile(str(marker))}, path)
    return str(path)


def _checkpoint(root, step=5, cfg=None):
    """A sealed checkpoint folder as the trainer writes it: DeepSpeed's model-states file (state under "module",
    with the wrappers' key prefixes) and the COMPLETE marker carrying the run's config."""
    cfg = cfg or load_config("default", _TINY)
    torch.manual_seed(step)
    model = build_model(cfg.model)
    folder = root / f"step{step:09d}"
    folder.mkdir(parents=True)
    torch.save({"module": {f"module.{k}": v for k, v in model.state_dict().items()}, "global_steps": step},
               folder / MODEL_STATES)
    (folder / COMPLETE).write_text(json.dumps({"step": step, "config": to_dict(cfg), "world_size": 1}))
    return model, cfg


def test_a_pickle_that_runs_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    hostile_file(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeFileError, match="refusing to load.*evil.pt"):
        load_weights(str(tmp_path / "evil.pt"))
    folder = tmp_path / "ckpt" / "step000000001"
    folder.mkdir(parents=True)
    hostile_file(folder / MODEL_STATES, marker)
    (folder / COMPLETE).write_text("{}")
    with pytest.raises(UnsafeFileError, match=MODEL_STATES):
        load_weights(str(tmp_path / "ckpt"))
    assert not marker.exists()
    torch.save({"module": {}, "payload": Hostile(str(marker))}, tmp_path / "check.pt")
    torch.load(tmp_path / "check.pt", weights_only=False)  # the control: a full unpickle does run it
    assert marker.exists()


def test_checkpoint_dir_gives_its_newest_complete_checkpoint(tmp_path):
    _checkpoint(tmp_path, step=5)
    newest, cfg = _checkpoint(tmp_path, step=9)
    (tmp_path / "step000000012").mkdir()  # being written: no marker
    w = load_weights(str(tmp_path))
    assert w.kind == "checkpoint" and w.path.endswith("step000000009") and w.meta["step"] == 9
    assert w.config["model"]["proj_layers"] == 3
    for k, v in newest.backbone.state_dict().items():
        assert torch.equal(w.backbone()[k], v)
    assert set(w.head()) == set(newest.head.state_dict())


def test_export_round_trips_through_state_dict_and_safetensors(tmp_path):
    model, cfg = _checkpoint(tmp_path / "ckpt")
    paths = export(load_weights(str(tmp_path / "ckpt")), str(tmp_path / "out"), head=True)
    assert [os.path.basename(p) for p in paths] == ["backbone.pt", "backbone.safetensors", "head.pt",
                                                     "head.safetensors", "config.yaml"]
    from safetensors.torch import load_file as st_load

    fresh = build_backbone("resnet18", width_mult=0.125, cifar_stem=True)
    fresh.load_state_dict(torch.load(tmp_path / "out" / "backbone.pt", weights_only=True), strict=True)
    tensors = st_load(tmp_path / "out" / "backbone.safetensors")
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v) and torch.equal(tensors[k], v)
    head = ProjectionHead(model.backbone.feature_dim, 24, 8, num_layers=3)
    head.load_state_dict(st_load(tmp_path / "out" / "head.safetensors"), strict=True)
    again = load_weights(str(tmp_path / "out" / "backbone.safetensors"))  # the config rides in the metadata
    assert again.kind == "backbone" and load_config(None, base=again.config) == cfg
    assert load_weights(str(tmp_path / "out" / "backbone.pt")).config == to_dict(cfg)  # from config.yaml beside it


def test_classifier_file_loads_weights_only_with_its_meta(tmp_path):
    cfg = load_config("default", _TINY)
    model = torch.nn.Linear(3, 2)
    path = save_classifier(model, str(tmp_path / "classifier.pt"), to_dict(cfg), num_classes=2, head_layers=1,
                           top1=51.5)
    w = load_weights(path)
    assert w.kind == "classifier" and w.meta["head_layers"] == 1 and w.meta["top1"] == 51.5
    assert torch.equal(w.state["weight"], model.weight)
    assert isinstance(load_file(path), dict)


def test_what_is_not_weights_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_weights(str(tmp_path))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state_dict"):
        load_weights(str(tmp_path / "list.pt"))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_weights(str(tmp_path / "bad.safetensors"))
