"""``fastclr finetune``: a class-balanced 10% subset written as a list and read back, v2's head layers under the
classifier, the fine-tuned network as a weights_only file, and the errors a user can make."""
import numpy as np
import pytest
import torch

from fastclr.cli import main
from fastclr.config import load_config
from fastclr.data import build_source
from fastclr.tasks.finetune import run_finetune
from fastclr.weights import load_weights
from tests.tasks.conftest import task_args

FAST = ["finetune.epochs=4", "finetune.global_batch_size=32", "finetune.log_every=1"]


def test_ten_percent_from_head_layer_1_and_0(pretrained, tmp_path):
    run, _ = pretrained
    one = run_finetune(str(run / "ckpt"), overrides=task_args(tmp_path / "one", *FAST, "finetune.labels=10%",
                                                              "finetune.from_head_layer=1"))
    listed = [line.strip() for line in open(tmp_path / "one" / "finetune" / "labels.txt") if not line.startswith("#")]
    source = build_source(load_config("default").data, "train")
    names = [source.sample_name(i) for i in range(len(source))]
    labels = source.labels[[names.index(n) for n in listed]]
    assert np.bincount(labels).tolist() == [14] * 10  # round(0.1 · 1437 / 10) of each class
    assert one["labelled_images"] == 140 and 0 <= one["top1"] <= one["top5"] <= 100

    zero = run_finetune(str(run / "ckpt"), overrides=task_args(
        tmp_path / "zero", *FAST, f"finetune.labels={tmp_path / 'one' / 'finetune' / 'labels.txt'}",
        "finetune.from_head_layer=0"))
    assert zero["labelled_images"] == 140  # the list names the same samples
    a = load_weights(str(tmp_path / "one" / "finetune" / "classifier.pt"))
    b = load_weights(str(tmp_path / "zero" / "finetune" / "classifier.pt"))
    assert (a.meta["head_layers"], b.meta["head_layers"]) == (1, 0)
    assert set(a.state) - set(b.state) == {"head.mlp.0.weight", "head.mlp.1.weight", "head.mlp.1.bias",
                                           "head.mlp.1.running_mean", "head.mlp.1.running_var",
                                           "head.mlp.1.num_batches_tracked"}
    assert a.state["fc.weight"].shape[1] == 64 and b.state["fc.weight"].shape[1] == 64  # head hidden 64; backbone 64
    random = run_finetune(str(run / "ckpt"), overrides=task_args(tmp_path / "random", *FAST, "finetune.labels=10%",
                                                                 "finetune.from_head_layer=1"), random_init=True)
    assert one["top1"] > random["top1"] + 10, (one["top1"], random["top1"])  # the same 140 labels, no pretraining
    # The whole network trained: the backbone moved away from the pretrained one.
    pre = load_weights(str(run / "ckpt")).backbone()
    assert not torch.equal(a.state["backbone.conv1.weight"], pre["conv1.weight"])


def test_mistakes_fail_before_compute_naming_the_problem(pretrained, tmp_path, capsys):
    run, _ = pretrained
    assert main(["finetune", str(run / "ckpt"), "--from-head-layer", "4", *task_args(tmp_path)]) == 2
    assert "finetune.from_head_layer" in capsys.readouterr().err
    assert main(["finetune", str(run / "backbone.pt"), "--from-head-layer", "1", *task_args(tmp_path)]) == 2
    assert "no projection head" in capsys.readouterr().err
    assert main(["finetune", str(run / "ckpt"), "--labels", str(tmp_path / "missing.txt"), *task_args(tmp_path)]) == 2
    assert "missing.txt' does not exist" in capsys.readouterr().err
    # 140 labelled images cannot fill a batch of 256: the error names the field finetune reads
    assert main(["finetune", str(run / "ckpt"), "finetune.global_batch_size=256", *task_args(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "finetune.global_batch_size" in err and "train.global_batch_size" not in err
    with pytest.raises(SystemExit):
        main(["finetune", "--labels"])


def test_a_time_budget_sizes_the_stage_and_its_config_records_the_choice(pretrained, tmp_path):
    """train.time_budget_minutes works for a stage as for pretraining: the length is chosen from the measured speed
    within finetune.epochs, the stage's config.yaml records it (a recipe of this run), and a stage without a warm-up
    to measure in is refused naming the stage's field."""
    import time

    from fastclr.config import ConfigError

    run, _ = pretrained
    args = ["finetune.epochs=5000", "finetune.warmup_epochs=2", "finetune.global_batch_size=32",
            "train.time_budget_minutes=0.25"]
    t0 = time.monotonic()
    run_finetune(str(run / "ckpt"), overrides=task_args(tmp_path, *args))
    assert time.monotonic() - t0 < 2 * 15
    saved = load_config(str(tmp_path / "finetune" / "config.yaml"))
    assert saved.train.time_budget_minutes == 0 and 2 < saved.finetune.epochs < 5000
    with pytest.raises(ConfigError, match="finetune.warmup_epochs"):
        run_finetune(str(run / "ckpt"), overrides=task_args(tmp_path / "b", "train.time_budget_minutes=1"))


def test_submit_checks_a_stage_against_its_source_before_anything_is_queued(pretrained, capsys):
    """``submit.py --task finetune --source CKPT``: the stage's config is the source's, so the batch arithmetic
    printed and checked is the finetune section's, and its errors name that section's fields."""
    import importlib.util
    import os

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("fastclr_submit",
                                                  os.path.join(ROOT, "launchers", "slurm", "submit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = str(pretrained[0] / "ckpt")
    base = ["--task", "finetune", "--source", ckpt, "--nodes", "1", "--gpus-per-node", "2", "--cpu", "--dry-run"]
    assert module.main(base) == 0
    out = capsys.readouterr().out
    assert "batch: global 64 = micro 32 x accumulation 1 x world 2" in out  # the default recipe's finetune section
    assert "--task finetune --source " + ckpt in out and "dry run: nothing submitted" in out
    assert module.main(base + ["finetune.global_batch_size=63"]) == 2
    assert "'finetune.global_batch_size'" in capsys.readouterr().err
