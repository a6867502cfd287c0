"""``fastclr export``: backbone (torchvision names) and head, state_dict and safetensors, from a checkpoint."""
import torch

from fastclr.cli import main
from fastclr.weights import load_weights


def test_export_of_a_checkpoint_dir_with_its_head(pretrained, tmp_path, capsys):
    run, _ = pretrained
    assert main(["export", str(run / "ckpt"), "--head", "--out", str(tmp_path)]) == 0
    assert "backbone.safetensors" in capsys.readouterr().out
    ckpt = load_weights(str(run / "ckpt"))
    exported = torch.load(tmp_path / "backbone.pt", weights_only=True)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "backbone.safetensors")
    assert list(exported) == list(ckpt.backbone()) and set(tensors) == set(exported)
    assert all(torch.equal(exported[k], v) and torch.equal(tensors[k], v) for k, v in ckpt.backbone().items())
    assert set(load_file(tmp_path / "head.safetensors")) == set(ckpt.head())
    # The same names and values as the run's own backbone.pt (written from the live model at the end).
    final = torch.load(run / "backbone.pt", weights_only=True)
    assert list(final) == list(exported) and all(torch.equal(final[k], exported[k]) for k in final)


def test_export_refuses_recipes(pretrained, tmp_path, capsys):
    run, _ = pretrained
    try:
        main(["export", str(run / "ckpt"), "model.width_mult=2"])
    except SystemExit as e:
        assert e.code == 2
    assert "takes no recipe or overrides" in capsys.readouterr().err
