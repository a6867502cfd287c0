"""What the commands after pretraining share: the command line, the config of a source, the world, the networks.

Every command takes a SOURCE (a checkpoint folder or checkpoint.dir, ``backbone.pt``/``.safetensors``, or a
``classifier.pt`` of finetune/distill; read by :mod:`fastclr.weights`, never unpickled), then ``--config RECIPE``
(applied over the source's own config, which carries the network, the data and the task sections) and
``section.field=value`` overrides. Under ``deepspeed --module fastclr <command>`` every rank runs it; the exit status
is 0 done, 2 a bad config, a missing or unsafe file (before any compute), 4/5 as in pretraining.
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


def task_config(weights, recipe: str | None, overrides: list[str]):
    """The source's config ← ``recipe`` ← ``overrides``."""
    from ..config import ConfigError, load_config

    if weights.config is None and recipe is None:
        raise ConfigError(f"'{weights.path}' carries no config (no config.yaml beside it): give --config with the "
                          "recipe of the run that trained it (its model and data sections)")
    return load_config(recipe, overrides, base=weights.config)


def start(cfg):
    """Device checks, the process group, rank-aware logging: the world of a command."""
    from .. import logs, runtime

    runtime.check_gpu_usable()
    rt = runtime.setup(cfg.distributed.backend, cfg.distributed.timeout)
    logs.setup(rt.rank)
    return rt


def norm_layer(cfg, rt):
    """Global BN over the ranks (or groups) when the config asks for it, as in pretraining; None otherwise."""
    size = cfg.distributed.bn_group_size or rt.world_size
    if not cfg.distributed.global_bn or size == 1:
        return None
    from ..distributed import global_bn_layer

    return global_bn_layer(size)


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


def test_loader(cfg, rt, batch_size: int = 256):
    """The held-out split, centre crops, this rank's shard (every image: the figure is the whole split's)."""
    from ..config import autocast_dtype
    from ..data import build_eval_loader

    return build_eval_loader(cfg.data, "test", batch_size=batch_size, device=rt.device,
                             dtype=autocast_dtype(cfg) or torch.float32, channels_last=cfg.precision.channels_last,
                             shard_id=rt.rank, num_shards=rt.world_size)


def train_loader(cfg, task, rt, plan, source):
    from ..config import autocast_dtype
    from ..data.labelled import build_labelled_loader

    return build_labelled_loader(cfg.data, source, crop_area=task.crop_area, batch_size=plan.micro_batch,
                                 shard_id=rt.rank, num_shards=rt.world_size, device=rt.device,
                                 dtype=autocast_dtype(cfg) or torch.float32, channels_last=cfg.precision.channels_last)


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


def supervise(cfg, task, name: str, rt, model, source, loss_fn, out: str) -> tuple[object, dict]:
    """Train ``model`` on ``source`` with the task section ``task`` and score it on the held-out split:
    (the run, whose ``model`` is the trained network, and its figures)."""
    from ..classify import SupervisedRun, task_plan

    plan = task_plan(task, name, rt.world_size)
    run = SupervisedRun(cfg, task, name, rt, plan, model, train_loader(cfg, task, rt, plan, source),
                        test_loader(cfg, rt), loss_fn, out)
    log.info(f"{name}: {cfg.model.arch} x{cfg.model.width_mult:g}, {run.loader.num_samples} training images, "
             f"{rt.world_size} rank(s) on {rt.device.type}, global batch {plan.global_batch} = {plan.micro_batch} x "
             f"{plan.accumulation} x {plan.world_size}, {run.schedule.total_steps} steps "
             f"({run.steps_per_epoch}/epoch), {task.optimizer} peak LR {run.schedule.peak_lr:.3g}; output in {out}")
    return run, run.run()


def write_result(out: str, results: dict) -> str:
    import json

    from ..atomic import write_text

    path = os.path.join(out, "result.json")
    write_text(path, json.dumps(results, indent=1) + "\n")
    return path
