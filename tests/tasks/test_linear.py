"""``fastclr linear``: the frozen-backbone protocol on a checkpoint and on the random-init encoder."""
import json

from fastclr.tasks.linear import run_linear
from tests.tasks.conftest import task_args


def test_linear_protocol_reports_top1_top5_for_checkpoint_and_random_init(pretrained, tmp_path, capsys):
    run, pretraining = pretrained
    fast = ["linear.epochs=3", "linear.global_batch_size=64", "linear.base_lr=2.0"]
    got = run_linear(str(run / "backbone.pt"), overrides=task_args(tmp_path, *fast))
    base = run_linear(str(run / "backbone.pt"), overrides=task_args(tmp_path, *fast), random_init=True)
    for r in (got, base):
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["test_images"] == 360
    assert not got["random_init"] and base["random_init"]
    saved = json.loads((tmp_path / "linear" / "result.json").read_text())
    assert saved["top1"] == got["top1"] and (tmp_path / "linear-random-init" / "result.json").is_file()
    # What pretraining bought, under the same protocol: a stage that ignored the checkpoint (or trained the
    # encoder, or read the wrong features) would not clear the random-init encoder by this much.
    assert got["top1"] > base["top1"] + 10, (got["top1"], base["top1"])
    # ... and says how its figure relates to the pretraining run's own quick probe (read from that run's metrics)
    assert f"the pretraining run's quick probe ({pretraining['probe_top1']:.1f}%)" in capsys.readouterr().out
