"""``fastclr export SOURCE [--out DIR] [--head]``: the backbone — and with ``--head`` the projection head (or a
fine-tuned network's kept head layers) — as a plain ``state_dict`` (``backbone.pt``) and as safetensors
(``backbone.safetensors``), from any checkpoint, a preempted run's included.

    fastclr export runs/default/checkpoints                   # the newest complete checkpoint → runs/default/export
    fastclr export runs/default/checkpoints/step000000375 --head --out /tmp/r18

Keys are torchvision's ResNet names without ``fc`` (a width-1, standard-stem, SK-free backbone loads into
``torchvision.models.resnet50()`` with ``strict=False``); SK and ResNet-D keys are listed in
``fastclr/export.py``. ``config.yaml`` is written beside them, so ``fastclr eval`` / ``linear`` /
``finetune`` take the export as a SOURCE. Nothing here unpickles: the checkpoint is read with weights_only=True.
"""
from __future__ import annotations

import os
import sys

from . import common


def default_out(weights) -> str:
    """``<logging.dir>/export`` of the run that made the weights, or ``export/`` beside the source file."""
    if weights.config and weights.config.get("logging", {}).get("dir"):
        return os.path.join(weights.config["logging"]["dir"], "export")
    return os.path.join(os.path.dirname(os.path.abspath(weights.path)), "export")


def _main(argv) -> int:
    from ..export import export
    from ..weights import load_weights

    p = common.parser("export", __doc__, "checkpoint folder, checkpoint.dir, backbone.pt or classifier.pt",
                      training=False)
    p.add_argument("--out", default=None, help="output folder (default: <logging.dir>/export of the source's run)")
    p.add_argument("--head", action="store_true", help="also write head.pt and head.safetensors")
    args = p.parse_intermixed_args(argv)
    if args.overrides or args.config:
        p.error("export takes no recipe or overrides: it writes the tensors as they are")
    weights = load_weights(args.source)
    paths = export(weights, args.out or default_out(weights), head=args.head)
    print(f"fastclr: exported {weights.kind} {weights.path}: " + ", ".join(paths), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.run_main(_main, sys.argv[1:] if argv is None else argv)
