"""SimCLR pretraining entry point.

    deepspeed launchers/pretrain.py                         # embedded default dataset, whatever this machine has
    deepspeed --num_gpus 8 launchers/pretrain.py --config launchers/configs/imagenet_resnet50_bs4096.yaml
    python launchers/pretrain.py --config launchers/configs/cifar10_resnet18.yaml train.epochs=200 data.path=/data/cifar

Wiring only: read the recipe and overrides, hand them to the library.
"""
import argparse
import os
import sys

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_RECIPE, help="YAML recipe (default: %(default)s)")
    parser.add_argument("--resume", default=None, help="'auto', 'none' or a checkpoint tag/path (checkpoint.resume)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.field=value, applied after the recipe")
    args = parser.parse_args(argv)

    from fastclr.config import ConfigError, load_config
    from fastclr.slurm import PREEMPTED_EXIT_CODE
    from fastclr.trainer import run

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        results = run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"fastclr: error: {e}", file=sys.stderr, flush=True)
        return 2
    # 3: stopped by SIGUSR1/SIGTERM with a complete checkpoint (requeued under Slurm); the next start resumes.
    return PREEMPTED_EXIT_CODE if results["stop_reason"] == "signal" else 0


if __name__ == "__main__":
    sys.exit(main())
