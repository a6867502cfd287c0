"""``fastclr finetune SOURCE --labels 1%|10%|FILE [--from-head-layer K]``: SimCLR v2 fine-tuning (Chen et al. 2020b,
sec. 2): the backbone and the first K layers of the projection head, topped by a new linear classifier, all trained
on a class-balanced subset of the training labels (section ``finetune``).

    fastclr finetune runs/cifar/checkpoints --labels 10% --config finetune_cifar10
    fastclr finetune CKPT --labels imagenet_subsets/1percent.txt --config finetune_imagenet_1pct
    fastclr finetune CKPT --labels 10% --random-init                   # the same fine-tuning without pretraining

The subset is drawn from ``finetune.subset_seed`` (the same images for the same seed and dataset) and written to
``<out>/labels.txt`` — one sample per line, the format google-research/simclr's ``imagenet_subsets`` lists use and
``--labels FILE`` reads. v2's recipe: LARS, batch 1024, LR 0.005·√B (0.16), no weight decay, no warm-up, global BN,
60 epochs on 1% and 30 on 10% of ImageNet, from the first layer of a 3-layer head. The network is written to
``<logging.dir>/finetune/classifier.pt`` (the TEACHER of ``fastclr distill``).

Like every stage it checkpoints to ``<output>/checkpoints`` (``checkpoint.*``), resumes from there when started
again, stops cleanly on SIGUSR1/SIGTERM (exit 3, requeued under Slurm) and takes ``train.stop_at_step``,
``train.max_minutes`` and ``train.time_budget_minutes``.
"""
from __future__ import annotations

import logging
import os
import sys

from . import common

log = logging.getLogger("fastclr")


def label_subset(source, labels: str, seed: int):
    """Sorted indices of the labelled subset: a class-balanced fraction or the samples a file lists."""
    from ..config.tasks import label_fraction
    from ..data.subsets import balanced_subset, read_subset

    fraction = label_fraction(labels)
    if fraction is None:
        return read_subset(source, labels)
    return balanced_subset(source.labels, fraction, seed)


def run_finetune(source: str, recipe: str | None = None, overrides: list[str] = (), random_init: bool = False) -> dict:
    from ..config import to_dict
    from ..data import build_source
    from ..data.subsets import write_subset
    from ..engine import norm_layer
    from ..models.classifier import classifier_from
    from ..export import save_classifier
    from ..weights import load_weights

    weights = load_weights(source)
    cfg = common.task_config(weights, recipe, list(overrides), "finetune", random_init)
    task = cfg.finetune
    if task.from_head_layer > cfg.model.proj_layers:
        from ..config import ConfigError

        raise ConfigError(f"config field 'finetune.from_head_layer': {task.from_head_layer} is more than the "
                          f"{cfg.model.proj_layers} layers of the projection head (model.proj_layers)")
    rt = common.start(cfg)
    train = build_source(cfg.data, "train")
    classes = common.num_classes(train)
    chosen = label_subset(train, task.labels, task.subset_seed)
    out = common.out_dir(cfg, task, "finetune", random_init)
    list_path = os.path.join(out, "labels.txt")
    if rt.is_main:
        write_subset(train, chosen, list_path, f"{len(chosen)} labelled samples of {train.name}: finetune.labels="
                     f"{task.labels}, subset_seed={task.subset_seed}")
    encoder = common.pretrained_model(weights, cfg, norm_layer(cfg, rt.world_size), need_head=task.from_head_layer > 0,
                                      random_init=random_init)
    model = classifier_from(encoder, classes, task.from_head_layer, zero_init=task.zero_init_classifier, seed=cfg.seed)
    run, results = common.supervise(cfg, "finetune", rt, model, train.subset(chosen), common.classification_loss,
                                    out, common.origin(weights, random_init))
    if common.stopped(results):
        return results
    results.update(source=weights.path, random_init=random_init, labels=task.labels, labelled_images=len(chosen),
                   from_head_layer=task.from_head_layer)
    if rt.is_main:
        common.write_result(out, results)
        save_classifier(run.model, os.path.join(out, "classifier.pt"), to_dict(cfg), num_classes=classes,
                        head_layers=task.from_head_layer, label_list=os.path.abspath(list_path),
                        top1=results["top1"], top5=results["top5"], source=weights.path)
    what = "random init" if random_init else weights.path
    log.info(f"RESULT finetune top-1 {results['top1']:.1f}% top-5 {results['top5']:.1f}% ({len(chosen)} labels = "
             f"{task.labels}, from head layer {task.from_head_layer}, {what}); network in {out}/classifier.pt")
    common.relate_to_quick_probe(weights, cfg, results, f"fine-tunes the whole network on {len(chosen)} labelled "
                                 f"images only (finetune.labels={task.labels}), random-resized crops and flips")
    return results


def _main(argv) -> int:
    p = common.parser("finetune", __doc__, "checkpoint folder, checkpoint.dir or backbone.pt/.safetensors")
    p.add_argument("--labels", default=None, help="1%%, 10%%, ... or a file list (finetune.labels)")
    p.add_argument("--from-head-layer", type=int, default=None, metavar="K",
                   help="head layers kept under the classifier (finetune.from_head_layer; v2: 1)")
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.labels is not None:
        overrides.append(f"finetune.labels={args.labels}")
    if args.from_head_layer is not None:
        overrides.append(f"finetune.from_head_layer={args.from_head_layer}")
    return common.exit_status(run_finetune(args.source, args.config, overrides, random_init=args.random_init))


def main(argv: list[str] | None = None) -> int:
    return common.run_main(_main, sys.argv[1:] if argv is None else argv)
