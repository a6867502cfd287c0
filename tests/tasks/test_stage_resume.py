"""Every stage survives a cluster: stopped at a step and started again, linear, finetune and distill end on the same
weights and figures, bit for bit, as the uninterrupted command (accumulation 2 in finetune); SIGUSR1 makes a running
stage checkpoint and exit 3, and the next start resumes from there."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from fastclr import checkpoint
from fastclr.tasks.distill import run_distill
from fastclr.tasks.finetune import run_finetune
from fastclr.tasks.linear import run_linear
from tests.helpers import ROOT, subprocess_env, wait_for
from tests.tasks.conftest import task_args

LINEAR = ["linear.epochs=1", "linear.global_batch_size=64", "linear.base_lr=2.0", "linear.log_every=1"]  # 22 steps
FINETUNE = ["finetune.epochs=4", "finetune.global_batch_size=32", "finetune.micro_batch_size=16",  # 4 steps/epoch,
            "finetune.log_every=1"]                                                                 # accumulation 2
DISTILL = ["distill.epochs=0.5", "distill.warmup_epochs=0.2", "distill.global_batch_size=64",       # 11 steps
           "distill.log_every=1", "distill.label_weight=0.5"]


def final_state(ckpt_dir):
    """(step, parameters) of the newest complete checkpoint of a stage."""
    step, tag = checkpoint.complete_tags(str(ckpt_dir))[-1]
    return step, torch.load(os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]


def assert_same_run(a_dir, b_dir, name):
    (sa, pa), (sb, pb) = final_state(a_dir / name / "checkpoints"), final_state(b_dir / name / "checkpoints")
    assert sa == sb and pa.keys() == pb.keys()
    differ = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    ra, rb = (json.loads((d / name / "result.json").read_text()) for d in (a_dir, b_dir))
    assert (ra["top1"], ra["top5"]) == (rb["top1"], rb["top5"])


def stop_then_resume(command, source, out, args, stop):
    first = command(source, overrides=task_args(out, *args, f"train.stop_at_step={stop}"))
    assert first["stop_reason"] == "stop_at_step"
    return command(source, overrides=task_args(out, *args))


def test_linear_stopped_and_resumed_equals_uninterrupted(pretrained, tmp_path):
    source = str(pretrained[0] / "ckpt")
    whole = run_linear(source, overrides=task_args(tmp_path / "a", *LINEAR))
    again = stop_then_resume(run_linear, source, tmp_path / "b", LINEAR, stop=9)
    assert again["stop_reason"] is None and whole["top1"] == again["top1"]
    assert_same_run(tmp_path / "a", tmp_path / "b", "linear")


def test_finetune_with_accumulation_stopped_and_resumed_equals_uninterrupted(pretrained, tmp_path):
    source = str(pretrained[0] / "ckpt")
    run_finetune(source, overrides=task_args(tmp_path / "a", *FINETUNE))
    stop_then_resume(run_finetune, source, tmp_path / "b", FINETUNE, stop=7)
    assert_same_run(tmp_path / "a", tmp_path / "b", "finetune")
    a, b = (torch.load(d / "finetune" / "classifier.pt", weights_only=True)["state_dict"]
            for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_stopped_and_resumed_equals_uninterrupted(teacher, tmp_path):
    run_distill(str(teacher), overrides=task_args(tmp_path / "a", *DISTILL))
    stop_then_resume(run_distill, str(teacher), tmp_path / "b", DISTILL, stop=5)
    assert_same_run(tmp_path / "a", tmp_path / "b", "distill")


@pytest.mark.parametrize("stage", ["finetune", "distill"])
def test_usr1_checkpoints_exits_3_and_the_next_start_resumes(stage, pretrained, teacher, tmp_path):
    source = str(pretrained[0] / "ckpt") if stage == "finetune" else str(teacher)
    args = [sys.executable, "-m", "fastclr", stage, source,
            *task_args(tmp_path, f"{stage}.epochs=200", f"{stage}.global_batch_size=32", f"{stage}.log_every=1")]
    metrics = tmp_path / stage / "metrics.jsonl"
    proc = subprocess.Popen(args, env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(lambda: metrics.exists() and metrics.read_text().count('"train"') >= 3, 240, "3 training steps")
        proc.send_signal(signal.SIGUSR1)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 3, out[-3000:]
    stop = checkpoint.complete_tags(str(tmp_path / stage / "checkpoints"))[-1][0]
    assert f"signal SIGUSR1 received: checkpoint at step {stop} written" in out and stop >= 3
    assert not (tmp_path / stage / "result.json").exists()  # preempted: no figures, no network yet
    again = subprocess.run(args + [f"train.stop_at_step={stop + 2}"], env=subprocess_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert f"resumed from {tmp_path / stage / 'checkpoints' / checkpoint.tag_for(stop)} at step {stop}," in log
    assert checkpoint.complete_tags(str(tmp_path / stage / "checkpoints"))[-1][0] == stop + 2


def test_a_stage_does_not_resume_checkpoints_it_began_from_another_source(pretrained, tmp_path, capsys):
    """The stage's checkpoints record what it started from: the same output folder with another source (a new
    pretraining, the random-init baseline) is refused naming checkpoint.dir, never silently continued."""
    from fastclr.cli import main

    run = pretrained[0]
    args = [*task_args(tmp_path, *LINEAR), "train.stop_at_step=3", "linear.dir=" + str(tmp_path / "out")]
    assert main(["linear", str(run / "ckpt"), *args]) == 0
    assert main(["linear", str(run / "backbone.pt"), *args]) == 2
    assert "'checkpoint.dir'" in capsys.readouterr().err
