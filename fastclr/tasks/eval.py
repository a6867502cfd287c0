"""``fastclr eval SOURCE``: the kNN monitor and the quick linear probe of any checkpoint or exported backbone — what a
pretraining run prints at its end, from the same code (:func:`fastclr.eval.evaluate_run`) on the same config.

    fastclr eval runs/default/backbone.pt                       # config.yaml beside it says how it was trained
    fastclr eval runs/default/checkpoints                       # the newest complete checkpoint (a preempted one too)
    fastclr eval runs/default/checkpoints/step000000750 eval.baseline=false eval.knn_k=200
    deepspeed --num_gpus 8 --module fastclr eval CKPT           # every rank its shard, the same figures on each

kNN: the k nearest training features by cosine similarity vote with weights exp(sim/T) (Wu et al. 2018); probe:
softmax regression on the frozen, once-extracted features (section ``eval``). With ``eval.baseline`` (the default)
the random-init encoder of the same config is scored beside it.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from . import common

log = logging.getLogger("fastclr")


def evaluate_source(source: str, recipe: str | None = None, overrides: list[str] = ()) -> dict:
    """kNN (+ probe, + random-init baseline) figures of ``source`` on its config's held-out split; collective."""
    from ..eval import evaluate_run
    from ..summary import result_line
    from ..weights import load_weights

    weights = load_weights(source)
    cfg = common.task_config(weights, recipe, list(overrides))
    rt = common.start(cfg)
    model = common.to_device(common.pretrained_model(weights, cfg), cfg, rt.device)
    log.info(f"evaluating the backbone of {weights.path} ({weights.kind}; {cfg.model.arch} x{cfg.model.width_mult:g}) "
             f"on {cfg.data.dataset}, {rt.world_size} rank(s) on {rt.device.type}")
    results = evaluate_run(cfg, model, rt, with_baseline=cfg.eval.baseline, probe=cfg.eval.probe_epochs > 0)
    log.info(result_line(results))
    return results


def _main(argv) -> int:
    p = common.parser("eval", __doc__, "checkpoint folder, checkpoint.dir, backbone.pt/.safetensors or classifier.pt",
                      training=False)
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = p.parse_intermixed_args(argv)
    results = evaluate_source(args.source, args.config, args.overrides)
    if args.json and os.environ.get("RANK", "0") == "0":
        print(json.dumps(results), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.run_main(_main, sys.argv[1:] if argv is None else argv)
