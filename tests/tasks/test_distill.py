"""``fastclr distill``: a student trained against the fine-tuned teacher on the unlabelled split, scored beside it."""
import torch

from fastclr.cli import main
from fastclr.tasks.distill import run_distill
from fastclr.weights import load_weights
from tests.tasks.conftest import task_args


def test_self_distillation_and_a_smaller_student(teacher, tmp_path):
    fast = ["distill.epochs=1", "distill.warmup_epochs=0", "distill.global_batch_size=64", "distill.log_every=1"]
    same = run_distill(str(teacher), overrides=task_args(tmp_path / "same", *fast, "distill.label_weight=0.5"))
    assert same["teacher_top1"] == load_weights(str(teacher)).meta["top1"]  # the same split, the same figure
    assert same["student"] == "resnet18 x0.125" and 0 <= same["top1"] <= 100
    small = run_distill(str(teacher), overrides=task_args(tmp_path / "small", *fast, "distill.epochs=0.5",
                                                          "distill.student_arch=resnet18",
                                                          "distill.student_width_mult=0.0625",
                                                          # oneDNN (torch 2.13 CPU) never returns from the backward
                                                          # of a channels_last 1x1 stride-2 conv 4 -> 8 channels on
                                                          # AVX2-only CPUs; this 4-channel student has one.
                                                          "precision.channels_last=false"))
    student = load_weights(str(tmp_path / "small" / "distill" / "classifier.pt"))
    assert student.meta["head_layers"] == 0 and student.config["model"]["width_mult"] == 0.0625
    assert student.state["backbone.conv1.weight"].shape[0] == 4 and small["top1"] >= 0
    assert not any(k.startswith("head.") for k in student.state)


def test_a_pretrained_teacher_teaches_more_than_one_fine_tuned_from_random_init(pretrained, teacher, tmp_path):
    """The chain's point: distilling the fine-tuned pretrained network beats the same distillation of a teacher
    fine-tuned the same way from random init (labels only through the teacher: label_weight 0)."""
    from fastclr.tasks.finetune import run_finetune

    run, _ = pretrained
    run_finetune(str(run / "ckpt"), overrides=task_args(tmp_path / "rt", "finetune.epochs=6",
                                                        "finetune.global_batch_size=32"), random_init=True)
    weak = tmp_path / "rt" / "finetune-random-init" / "classifier.pt"
    fast = ["distill.epochs=6", "distill.warmup_epochs=0", "distill.global_batch_size=64"]  # 132 steps, ~7 s
    good = run_distill(str(teacher), overrides=task_args(tmp_path / "good", *fast))
    poor = run_distill(str(weak), overrides=task_args(tmp_path / "poor", *fast))
    assert good["teacher_top1"] > poor["teacher_top1"] + 10, (good, poor)
    # The student learns what its teacher knows (2-core AVX-512 EPYC: 32.8% from a 31.7% teacher; 6.1% from the
    # random-init-fine-tuned one at 11.4%).
    assert good["top1"] >= good["teacher_top1"] - 1 and good["top1"] > poor["top1"] + 10, (good, poor)


def test_the_teacher_must_be_a_fine_tuned_network(pretrained, tmp_path, capsys):
    run, _ = pretrained
    assert main(["distill", str(run / "ckpt"), *task_args(tmp_path)]) == 2
    assert "needs the fine-tuned teacher" in capsys.readouterr().err


def test_student_init_from_the_teacher_needs_the_teachers_network(teacher, tmp_path, capsys):
    assert main(["distill", str(teacher), "distill.student_init=teacher", "distill.student_arch=resnet34",
                 *task_args(tmp_path)]) == 2
    assert "distill.student_init" in capsys.readouterr().err
    assert torch.load(teacher, weights_only=True)["format"] == "fastclr-classifier"
