"""``fastclr distill TEACHER``: SimCLR v2's third step (Chen et al. 2020b, sec. 2, eq. 2–3) — a student trained on the
unlabelled training split against the fine-tuned teacher's temperature-softened predictions on the same augmented
view, optionally plus the cross-entropy on the teacher's labelled subset (section ``distill``).

    fastclr distill runs/cifar/finetune/classifier.pt --config distill_cifar10      # self-distillation
    fastclr distill TEACHER distill.student_arch=resnet50 distill.student_width_mult=1   # big-to-small

TEACHER is the ``classifier.pt`` of ``fastclr finetune``; its config gives the data and the network. The student is
the teacher's network (self-distillation) or ``distill.student_arch`` × ``student_width_mult``, with a linear
classifier on its backbone, initialised at random (v2) or from the teacher's backbone. v2: τ = 1, LARS, 400 epochs,
the pretraining's LR schedule, weight decay and batch, random crops and flips only. The student goes to
``<logging.dir>/distill/classifier.pt``; the teacher is scored on the same test split beside it.

Like every stage it checkpoints to ``<output>/checkpoints`` (``checkpoint.*``), resumes from there when started
again, stops cleanly on SIGUSR1/SIGTERM (exit 3, requeued under Slurm) and takes ``train.stop_at_step``,
``train.max_minutes`` and ``train.time_budget_minutes``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys

import numpy as np
import torch

from . import common

log = logging.getLogger("fastclr")


def student_network(cfg, teacher, classes: int, norm, seed: int):
    """(student model config, student Classifier) of the distill section."""
    from ..config import ConfigError
    from ..models import build_model
    from ..models.classifier import Classifier

    d = cfg.distill
    model_cfg = cfg.model if not d.student_arch else dataclasses.replace(
        cfg.model, arch=d.student_arch, width_mult=d.student_width_mult, sk_ratio=d.student_sk_ratio)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_model(model_cfg, norm_layer=norm).backbone
    if d.student_init == "teacher":
        if model_cfg != cfg.model:
            raise ConfigError("config field 'distill.student_init': 'teacher' copies the teacher's backbone, which "
                              f"needs the teacher's network; the student is {model_cfg.arch} x{model_cfg.width_mult:g}")
        backbone.load_state_dict(teacher.backbone.state_dict())
    return model_cfg, Classifier(backbone, None, classes, in_dim=backbone.feature_dim, seed=seed)


def labelled(train, cfg, teacher_meta: dict) -> np.ndarray:
    """Labels of the distillation set: the labelled subset's where ``label_weight`` > 0, -1 elsewhere."""
    from .finetune import label_subset

    out = np.full(len(train), -1, np.int64)
    if cfg.distill.label_weight > 0:
        spec = cfg.distill.labels or teacher_meta.get("label_list") or cfg.finetune.labels
        chosen = label_subset(train, spec, cfg.finetune.subset_seed)
        out[chosen] = train.labels[chosen]
    return out


def run_distill(teacher_path: str, recipe: str | None = None, overrides: list[str] = ()) -> dict:
    from ..config import autocast_dtype, to_dict
    from ..data import build_source
    from ..data.labelled import with_labels
    from ..engine import norm_layer
    from ..losses import distill_loss
    from ..stages.supervised import cross_entropy, evaluate, held_out_loader
    from ..export import save_classifier
    from ..weights import load_weights

    weights = load_weights(teacher_path)
    cfg = common.task_config(weights, recipe, list(overrides), "distill")
    if weights.kind != "classifier":
        raise ValueError(f"'{weights.path}' is a {weights.kind}: distill needs the fine-tuned teacher (the "
                         "classifier.pt of fastclr finetune)")
    task = cfg.distill
    rt = common.start(cfg)
    dtype = autocast_dtype(cfg)
    teacher = common.to_device(common.classifier_model(weights, cfg), cfg, rt.device).eval().requires_grad_(False)
    train = build_source(cfg.data, "train")
    classes = teacher.num_classes
    train = with_labels(train, labelled(train, cfg, weights.meta))
    student_cfg, student = student_network(cfg, teacher, classes, norm_layer(cfg, rt.world_size), cfg.seed)
    held_out = held_out_loader(cfg, rt)
    teacher_figures = evaluate(teacher, held_out, rt.device, dtype)
    w, tau = task.label_weight, task.temperature

    def loss_fn(engine, x, y):
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            soft = teacher(x)  # (B, C) on the student's view
        logits = engine(x)
        loss = distill_loss(logits, soft, tau)
        return loss if w == 0 else (1 - w) * loss + w * cross_entropy(logits, y)

    out = common.out_dir(cfg, task, "distill")
    run, results = common.supervise(common.with_model(cfg, student_cfg), "distill", rt, student, train, loss_fn, out,
                                    common.origin(weights), held_out)
    if common.stopped(results):
        return results
    results.update(teacher=weights.path, teacher_top1=teacher_figures["top1"], teacher_top5=teacher_figures["top5"],
                   student=f"{student_cfg.arch} x{student_cfg.width_mult:g}", label_weight=w, temperature=tau)
    if rt.is_main:
        common.write_result(out, results)
        save_classifier(run.model, os.path.join(out, "classifier.pt"), to_dict(common.with_model(cfg, student_cfg)),
                        num_classes=classes, head_layers=0, top1=results["top1"], top5=results["top5"],
                        teacher=weights.path, label_list=weights.meta.get("label_list", ""))
    log.info(f"RESULT distill student top-1 {results['top1']:.1f}% top-5 {results['top5']:.1f}% | teacher top-1 "
             f"{teacher_figures['top1']:.1f}% top-5 {teacher_figures['top5']:.1f}% ({results['student']} student, "
             f"{results['test_images']} test images); student in {out}/classifier.pt")
    return results


def _main(argv) -> int:
    args = common.parser("distill", __doc__, "the teacher: classifier.pt of fastclr finetune",
                         training=False).parse_intermixed_args(argv)
    return common.exit_status(run_distill(args.source, args.config, args.overrides))


def main(argv: list[str] | None = None) -> int:
    return common.run_main(_main, sys.argv[1:] if argv is None else argv)
