"""``fastclr pretrain [--config RECIPE] [section.field=value ...]``: SimCLR pretraining, from a checkout or installed.

    fastclr pretrain                                         # the embedded default dataset, whatever this machine has
    fastclr pretrain --config cifar10_resnet18 data.path=/data/cifar/train data.eval_path=/data/cifar/test
    deepspeed --num_gpus 8 --module fastclr pretrain --config imagenet_resnet50_bs4096
    deepspeed launchers/pretrain.py ...                       # the same, from a checkout

A recipe is a shipped recipe's name or a YAML file (the ``config.yaml`` a run writes is one). Exit status: 0 done,
2 a bad config or missing file (before any compute), 3 stopped by SIGUSR1/SIGTERM with a checkpoint written
(requeued under Slurm; the next start resumes), 4 a peer rank died or hung (distributed.timeout), 5 a checkpoint could
not be written (a full disk); after 4 and 5 the newest complete checkpoint is intact and the next start resumes from it.
"""
from __future__ import annotations

import argparse
import sys


def run(cfg) -> tuple[dict, int]:
    """Check the config against the world, set the world up, train and evaluate: (results, exit status)."""
    import torch

    from .. import runtime
    from ..config import validate_run
    from ..trainer import Trainer
    from .common import exit_status, start

    runtime.check_gpu_usable()
    _, world_size, _ = runtime.world_from_env()
    plan = validate_run(cfg, world_size, torch.cuda.is_available())
    rt = start(cfg)
    try:
        trainer = Trainer(cfg, rt, plan)
        try:
            results = trainer.train()
        finally:
            trainer.close()
        return results, exit_status(results, rt.is_main)
    finally:
        runtime.teardown()


def _parser() -> argparse.ArgumentParser:
    from ..config import DEFAULT_RECIPE, RECIPES_DIR, schema, shipped_recipes

    sections = ", ".join(f.name for f in __import__("dataclasses").fields(schema.Config))
    p = argparse.ArgumentParser(
        prog="fastclr pretrain", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog=f"config sections: {sections} (and seed). Every field is documented in {schema.__file__}; "
               f"'fastclr pretrain --fields' prints them all with their defaults. Shipped recipes "
               f"({RECIPES_DIR}): {', '.join(shipped_recipes())}.")
    p.add_argument("--config", default=DEFAULT_RECIPE, help="recipe name or YAML file (default: %(default)s)")
    p.add_argument("--resume", default=None, help="'auto', 'none' or a checkpoint tag/path (checkpoint.resume)")
    p.add_argument("--fields", action="store_true", help="print every config field with its default and doc; exit")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.add_argument("overrides", nargs="*", help="section.field=value, applied after the recipe")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ..config import ConfigError, describe, load_config
    from ..runtime import DeviceError, RunFailure

    if args.fields:
        print("\n".join(describe()))
        return 0
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        return run(cfg)[1]
    except (ConfigError, FileNotFoundError, DeviceError) as e:
        print(f"fastclr: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunFailure as e:  # a dead or hung peer rank, a checkpoint that could not be written
        print(f"fastclr: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
