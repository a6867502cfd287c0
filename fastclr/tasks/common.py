"""What the commands after pretraining share: the command line, the config of a source, the world, the networks.

Every command takes a SOURCE (a checkpoint folder or checkpoint.dir, ``backbone.pt``/``.safetensors``, or a
``classifier.pt`` of finetune/distill; read by :mod:`fastclr.weights`, never unpickled), then ``--config RECIPE``
(applied over the source's own config, which carries the network, the data and the task sections) and
``section.field=value`` overrides. The training commands (linear, finetune, distill) run on the trainer every stage
shares, with the same ``train.*`` and ``checkpoint.*`` fields as pretraining (the source's own describe the run
that made it and are not inherited): they auto-resume, checkpoint on SIGUSR1/SIGTERM and requeue under Slurm. Under
``deepspeed --module fastclr <command>`` every rank runs it; the exit status is 0 done, 2 a bad config, a missing or
unsafe file (before any compute), 3 stopped by a signal with a checkpoint written, 4/5 as in pretraining.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

import torch

log = logging.getLogger("fastclr")


def parser(command: str, doc: str, source_help: str, training: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fastclr {command}", description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(doc.split("\n\n")[1:]))
    p.add_argument("source", help=source_help)
    p.add_argument("--config", default=None, metavar="RECIPE",
                   help="recipe (shipped name or YAML) applied over the source's own config")
    if training:
        p.add_argument("--random-init", action="store_true",
                       help="the baseline: the source's network and config with freshly initialised weights")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.add_argument("overrides", nargs="*", help="section.field=value, applied after the recipe")
    return p


def task_config(weights, recipe: str | None, overrides: list[str], name: str | None = None,
                random_init: bool = False):
    """The source's config ← ``recipe`` ← ``overrides``; for a training stage ``name``, the source's ``train`` and
    ``checkpoint`` sections described the run that made it: the stage starts from their defaults (its batch and
    length are in its own section), and its checkpoints go to ``<stage output>/checkpoints`` unless
    ``checkpoint.dir`` is given."""
    from ..config import ConfigError, load_config

    if weights.config is None and recipe is None:
        raise ConfigError(f"'{weights.path}' carries no config (no config.yaml beside it): give --config with the "
                          "recipe of the run that trained it (its model and data sections)")
    if name is None:
        return load_config(recipe, overrides, base=weights.config)
    base = {k: v for k, v in (weights.config or {}).items() if k not in ("train", "checkpoint")}
    base["checkpoint"] = {"dir": ""}
    cfg = load_config(recipe, overrides, base=base)
    if not cfg.checkpoint.dir:
        cfg.checkpoint.dir = os.path.join(out_dir(cfg, getattr(cfg, name), name, random_init), "checkpoints")
    return cfg


def start(cfg):
    """Device checks, the process group, rank-aware logging, the data's sample index (rank 0 builds what is missing
    while the others wait): the world of a command."""
    from .. import logs, runtime
    from ..data.prepare import prepare

    runtime.check_gpu_usable()
    rt = runtime.setup(cfg.distributed.backend, cfg.distributed.timeout)
    logs.setup(rt.rank)
    prepare(cfg.data, rt)
    return rt


def _load(module: torch.nn.Module, state: dict, what: str, where: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the {what} tensors of '{where}' do not fit the network its config describes ({str(e)[:400]}"
                         "); give the config of the run that trained it") from None


def pretrained_model(weights, cfg, norm=None, *, need_head: bool = False, random_init: bool = False):
    """The SimCLR network of ``cfg.model`` with the source's backbone (and head, where it has one) loaded; with
    ``random_init`` the network as ``cfg.seed`` initialises it (what pretraining started from)."""
    from ..models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, norm_layer=norm)
    if random_init:
        return model
    _load(model.backbone, weights.backbone(), "backbone", weights.path)
    head = weights.head()
    if weights.kind == "checkpoint" and head:
        _load(model.head, head, "projection head", weights.path)
    elif need_head:
        raise ValueError(f"'{weights.path}' has no projection head ({weights.kind}); fine-tune with "
                         "--from-head-layer 0, or from a pretraining checkpoint")
    return model


def classifier_model(weights, cfg, norm=None):
    """A fine-tuned or distilled network (``classifier.pt``) as it was trained."""
    from ..models import build_model
    from ..models.classifier import classifier_from

    if weights.kind != "classifier":
        raise ValueError(f"'{weights.path}' is a {weights.kind}, not a fine-tuned network: give the classifier.pt "
                         "that fastclr finetune (or distill) wrote")
    model = classifier_from(build_model(cfg.model, norm_layer=norm), int(weights.meta["num_classes"]),
                            int(weights.meta["head_layers"]))
    _load(model, weights.state, "classifier", weights.path)
    return model


def num_classes(source) -> int:
    labelled = source.labels[source.labels >= 0]
    if len(labelled) == 0:
        raise ValueError(f"{source.name} has no labels (every sample is -1): a supervised step needs a labelled "
                         "training split (class folders, 'path label' lists or .cls members)")
    return int(labelled.max()) + 1


def out_dir(cfg, task, name: str, random_init: bool = False) -> str:
    return task.dir or os.path.join(cfg.logging.dir, name + ("-random-init" if random_init else ""))


def to_device(model: torch.nn.Module, cfg, device) -> torch.nn.Module:
    fmt = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt)


def with_model(cfg, model_cfg):
    return dataclasses.replace(cfg, model=model_cfg)


def run_main(body, argv) -> int:
    """``body(argv)`` with the errors a user can fix printed as one line and mapped to exit statuses."""
    from ..config import ConfigError
    from ..runtime import DeviceError, RunFailure, teardown
    from ..weights import UnsafeFileError

    already = torch.distributed.is_initialized()  # a caller's group (tests, a notebook) is left as it was
    try:
        return body(argv)
    except (ConfigError, FileNotFoundError, DeviceError, UnsafeFileError, ValueError) as e:
        print(f"fastclr: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunFailure as e:
        print(f"fastclr: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        if not already:
            teardown()


def supervise(cfg, name: str, rt, model, source, loss_fn, out: str, origin: str,
              held_out=None) -> tuple[object, dict]:
    """Train ``model`` on ``source`` as stage ``name`` (its section's batch and length) on the trainer every stage
    shares, and score it on the held-out split: (the trainer, whose ``model`` is the trained network, and its
    figures, with ``stop_reason``)."""
    from ..config import validate_run
    from ..stages.supervised import Supervised
    from ..trainer import Trainer

    plan = validate_run(cfg, rt.world_size, rt.cuda, local_files=False, section=name)
    trainer = Trainer(cfg, rt, plan, Supervised(cfg, name, model, source, loss_fn, out, origin, held_out))
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


def origin(weights, random_init: bool = False) -> str:
    """What a stage starts from, as its checkpoints record it: the weights' resolved file or checkpoint folder."""
    return "random-init" if random_init else os.path.abspath(weights.path)


def classification_loss(engine, images, labels):
    """Cross-entropy of the network's logits on the labelled samples (linear evaluation, fine-tuning)."""
    from ..stages.supervised import cross_entropy

    return cross_entropy(engine(images), labels)


def relate_to_quick_probe(weights, cfg, results: dict, protocol: str) -> None:
    """Say how this protocol's top-1 relates to the pretraining run's own quick probe, whose figure is read from
    that run's metrics where they are beside the checkpoint's config (``logging.dir``)."""
    import json

    path = os.path.join((weights.config or {}).get("logging", {}).get("dir", ""), "metrics.jsonl")
    quick = None
    if os.path.isfile(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if '"probe_top1"' in line]
        quick = rows[-1]["probe_top1"] if rows else None
    figure = f"{quick:.1f}%" if quick is not None else "in its RESULT line"
    log.info(f"How this relates to the pretraining run's quick probe ({figure}): that probe fits a linear classifier "
             "to features extracted once from centre crops (eval.probe_epochs on fixed features, every labelled "
             f"image); this figure ({results['top1']:.1f}%) {protocol}. They differ by design; compare figures of one "
             "protocol.")


def stopped(results: dict) -> bool:
    """Preempted (SIGUSR1/SIGTERM): the checkpoint is written, the stage's outputs are not (the next start ends it)."""
    return results.get("stop_reason") == "signal"


def exit_status(results: dict, is_main: bool | None = None) -> int:
    """A stage's exit status: after a stop on a signal (checkpoint complete on every rank) rank 0 (``is_main``; by
    default the process group's rank, else RANK) asks Slurm to requeue the job (a no-op outside Slurm) and every rank
    exits with PREEMPTED_EXIT_CODE (3); otherwise 0."""
    from ..preemption import PREEMPTED_EXIT_CODE

    if results.get("stop_reason") != "signal":
        return 0
    if is_main is None:
        dist = torch.distributed
        is_main = (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0
    if is_main:
        from ..slurm.launch import requeue

        requeue()
    return PREEMPTED_EXIT_CODE


def write_result(out: str, results: dict) -> str:
    import json

    from ..atomic import write_text

    path = os.path.join(out, "result.json")
    write_text(path, json.dumps(results, indent=1) + "\n")
    return path
