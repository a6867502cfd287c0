"""What a pretraining run says about itself: its first line (network, data, world, batch arithmetic, length, LR), the
closing lines and the RESULT line."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def describe_run(cfg, plan, device: str, total_steps: int, steps_per_epoch: int, peak_lr: float) -> str:
    """The run's first line: network, data, world, batch arithmetic, length, LR, loss."""
    from .config.run import precision_name
    from .data.sources import detect_kind

    data = detect_kind(cfg.data.path) if cfg.data.dataset == "auto" else cfg.data.dataset
    return (f"{cfg.model.arch} x{cfg.model.width_mult:g} on {data}, {plan.world_size} rank(s) on {device} "
            f"({precision_name(cfg, device == 'cuda')}), "
            f"global batch {plan.global_batch} = {plan.micro_batch} x {plan.accumulation} x {plan.world_size}, "
            f"{total_steps} steps ({steps_per_epoch}/epoch), peak LR {peak_lr:.3g}, loss impl {cfg.loss.impl}")


def result_line(results: dict) -> str:
    """``RESULT kNN top-1 …% (random init …%) | linear probe top-1 …% (random init …%)``."""
    line = f"RESULT kNN top-1 {results['knn_top1']:.1f}%"
    if "baseline_knn_top1" in results:
        line += f" (random init {results['baseline_knn_top1']:.1f}%)"
    if "probe_top1" in results:
        line += f" | linear probe top-1 {results['probe_top1']:.1f}%"
        if "baseline_probe_top1" in results:
            line += f" (random init {results['baseline_probe_top1']:.1f}%)"
    return line


def summarize(*, steps: int, elapsed_s: float, images_per_step: int, stop: str | None, ckpt_dir: str,
              run_dir: str, plots: list[str], backbone: str, results: dict) -> None:
    """The closing lines of a finished run (rank 0)."""
    log.info(f"{steps} steps in {elapsed_s / 60:.1f} min ({steps * images_per_step / max(elapsed_s, 1e-9):.0f} images/s "
             "incl. checkpoints)" + (f" — stopped early ({stop})" if stop else ""))
    log.info(f"checkpoints in {ckpt_dir}, metrics/plots in {run_dir} "
             f"({', '.join(os.path.basename(p) for p in plots)}), backbone in {backbone}")
    log.info(result_line(results))
