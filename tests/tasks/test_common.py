"""What every command shares: a pickle that runs code on load is refused by each of them, before any compute."""
import pytest
import torch

from fastclr.checkpoint import COMPLETE
from fastclr.cli import main
from fastclr.weights import MODEL_STATES
from tests.test_weights import hostile_file


@pytest.mark.parametrize("command", ["eval", "linear", "finetune", "distill", "export"])
def test_every_command_refuses_a_pickle_that_runs_code(command, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    file = hostile_file(tmp_path / "backbone.pt", marker)
    folder = tmp_path / "ckpt" / "step000000010"
    folder.mkdir(parents=True)
    hostile_file(folder / MODEL_STATES, marker)
    (folder / COMPLETE).write_text("{}")
    for source in (file, str(tmp_path / "ckpt")):
        assert main([command, source]) == 2
        err = capsys.readouterr().err
        assert "refusing to load" in err and "weights_only" in err
    assert not marker.exists()


def test_a_source_without_a_config_needs_a_recipe(tmp_path, capsys):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "backbone.pt")
    assert main(["eval", str(tmp_path / "backbone.pt")]) == 2
    assert "carries no config" in capsys.readouterr().err
