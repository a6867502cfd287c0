"""What a run tells its user: the bad images it skipped, the closing summary and RESULT line, and the PNG plots of
``metrics.jsonl`` (loss, LR, throughput, accuracy)."""
from __future__ import annotations

import json
import logging
import os

from . import atomic

log = logging.getLogger(__name__)


class BadSampleReport:
    """Names the bad images one rank met since the last report and rewrites its list of all of them
    (``<run_dir>/bad_samples.rank<R>.tsv``)."""

    SHOWN = 5

    def __init__(self, bad, run_dir: str, rank: int):
        self.bad, self.rank = bad, rank
        self.path = os.path.join(run_dir, f"bad_samples.rank{rank}.tsv")

    def __call__(self) -> None:
        fresh = self.bad.new_since_last_call()
        if not fresh:
            return
        everything = self.bad.names()
        atomic.write_text(self.path, "".join(f"{name}\t{reason}\n" for name, reason in everything))
        for name, reason in fresh[:self.SHOWN]:
            log.warning(f"rank {self.rank}: skipped bad image {name}: {reason}")
        more = f" ({len(fresh) - self.SHOWN} more)" if len(fresh) > self.SHOWN else ""
        log.warning(f"rank {self.rank}: {len(everything)} bad image(s) skipped so far{more}, listed in {self.path}")


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


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str) -> list[str]:
    """Draw loss, LR, throughput and probe accuracy from ``metrics.jsonl``; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    out = []
    for key, label in (("loss", "NT-Xent loss"), ("lr", "learning rate"), ("images_per_s", "images/s (all ranks)")):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*pts))
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        path = os.path.join(run_dir, f"{key}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in (("knn_top1", "kNN, pretrained"), ("probe_top1", "linear probe, pretrained"),
                           ("baseline_knn_top1", "kNN, random init"), ("baseline_probe_top1", "linear probe, random init")):
            pts = [(r["step"], r[key]) for r in evals if key in r]
            if pts:
                style = "--" if key.startswith("baseline") else "-"
                ax.plot(*zip(*pts), style, marker="o", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = os.path.join(run_dir, "accuracy.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out
