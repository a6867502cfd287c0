"""``fastclr linear SOURCE``: the standard linear evaluation protocol — a linear classifier trained on the frozen
backbone (eval mode: BN keeps its pretrained statistics), random-resized crops and flips from the DALI pipeline,
Nesterov momentum (or LARS), cosine LR; top-1 and top-5 on the held-out split (section ``linear``).

    fastclr linear runs/default/checkpoints
    fastclr linear runs/cifar/checkpoints --config linear_cifar10       # the CPU settings measured on CIFAR-10
    fastclr linear runs/cifar/checkpoints --random-init                 # the same protocol on a random encoder
    deepspeed --num_gpus 8 --module fastclr linear CKPT --config linear_imagenet

Chen et al. 2020 (appendix B.6) and google-research/simclr's README: batch 4096, 90 epochs, LR 0.1·B/256, momentum
0.9, no warm-up (ResNet-50, 100 pretraining epochs: ~64.5% top-1). Results go to ``<logging.dir>/linear``
(``result.json``, metrics, plots).

Like every stage it checkpoints to ``<output>/checkpoints`` (``checkpoint.*``), resumes from there when started
again, stops cleanly on SIGUSR1/SIGTERM (exit 3, requeued under Slurm) and takes ``train.stop_at_step``,
``train.max_minutes`` and ``train.time_budget_minutes``.
"""
from __future__ import annotations

import logging
import sys

import numpy as np

from . import common

log = logging.getLogger("fastclr")


def run_linear(source: str, recipe: str | None = None, overrides: list[str] = (), random_init: bool = False) -> dict:
    from ..data import build_source
    from ..models.classifier import classifier_from
    from ..weights import load_weights

    weights = load_weights(source)
    cfg = common.task_config(weights, recipe, list(overrides), "linear", random_init)
    rt = common.start(cfg)
    train = build_source(cfg.data, "train")
    classes = common.num_classes(train)
    train = train.subset(np.flatnonzero(train.labels >= 0))
    encoder = common.pretrained_model(weights, cfg, random_init=random_init)
    model = classifier_from(encoder, classes, 0, frozen=True, seed=cfg.seed)
    out = common.out_dir(cfg, cfg.linear, "linear", random_init)
    _, results = common.supervise(cfg, "linear", rt, model, train, common.classification_loss, out,
                                  common.origin(weights, random_init))
    if common.stopped(results):
        return results
    results.update(source=weights.path, random_init=random_init, epochs=cfg.linear.epochs)
    if rt.is_main:
        common.write_result(out, results)
    what = "random-init encoder" if random_init else weights.path
    log.info(f"RESULT linear top-1 {results['top1']:.1f}% top-5 {results['top5']:.1f}% ({what}, "
             f"{results['test_images']} test images)")
    common.relate_to_quick_probe(weights, cfg, results, "trains a linear classifier on the frozen encoder, seeing "
                                 f"random-resized crops and flips for {cfg.linear.epochs:g} epochs (the published "
                                 "linear protocol)")
    return results


def _main(argv) -> int:
    args = common.parser("linear", __doc__, "checkpoint folder, checkpoint.dir or backbone.pt/.safetensors").parse_intermixed_args(argv)
    return common.exit_status(run_linear(args.source, args.config, args.overrides, random_init=args.random_init))


def main(argv: list[str] | None = None) -> int:
    return common.run_main(_main, sys.argv[1:] if argv is None else argv)
