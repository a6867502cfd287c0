"""PNG plots of a run's ``metrics.jsonl``: loss, LR, throughput, and the accuracy of its evaluations."""
from __future__ import annotations

import json
import os


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
    for key, label in (("loss", "training loss"), ("lr", "learning rate"), ("images_per_s", "images/s (all ranks)")):
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
        for key, label in (("top1", "top-1, held-out split"), ("knn_top1", "kNN, pretrained"), ("probe_top1", "linear probe, pretrained"),
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
