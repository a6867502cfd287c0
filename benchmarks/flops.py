"""FLOPs counted, not guessed: PyTorch's ``FlopCounterMode`` over one forward and backward of the SimCLR model.

    PYTHONPATH=. python -m benchmarks.flops

Rows: forward FLOPs per image and training FLOPs per image (forward + backward of one view) for each model and
resolution the train-step benchmark runs, and on CUDA the device's measured dense bf16 matmul rate, the roofline
the train-step rows are compared with. (The counter counts matmuls and convolutions, 2 FLOPs per multiply-add;
elementwise work is left out, as in every published FLOP figure for these networks.)
"""
from __future__ import annotations

import argparse
import os

import torch

from .common import RESULTS, Recorder, time_calls

MODELS = {
    "resnet18 32px": dict(arch="resnet18", cifar_stem=True, image_size=32, width_mult=1.0),
    "resnet50 224px": dict(arch="resnet50", cifar_stem=False, image_size=224, width_mult=1.0),
}


def build(arch: str, cifar_stem: bool, width_mult: float = 1.0, hidden: int = 2048, out: int = 128):
    from fastclr.models import ProjectionHead, SimCLRModel, build_backbone

    backbone = build_backbone(arch, width_mult=width_mult, cifar_stem=cifar_stem)
    return SimCLRModel(backbone, ProjectionHead(backbone.feature_dim, hidden, out))


def count(model: torch.nn.Module, image_size: int) -> tuple[float, float]:
    """(forward FLOPs per image, forward+backward FLOPs per image), counted on a batch of 2 (BN needs > 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, image_size, image_size)
    model.train()
    with FlopCounterMode(display=False) as fwd:
        z = model(x)
    with FlopCounterMode(display=False) as bwd:
        z.float().pow(2).sum().backward()
    model.zero_grad(set_to_none=True)
    return fwd.get_total_flops() / 2, (fwd.get_total_flops() + bwd.get_total_flops()) / 2


def matmul_rate(device: torch.device, dtype=torch.bfloat16, n: int = 8192, repeats: int = 5) -> float:
    """Dense (n × n)·(n × n) matmul FLOP/s, median of ``repeats``."""
    import statistics

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_calls(lambda: torch.mm(a, b), repeats=repeats, warmup=2, device=device)
    return 2 * n ** 3 / statistics.median(times)


def run(rec: Recorder, *, quick: bool = False, smoke: bool = False, models: dict | None = None) -> dict:
    """Records the counts; returns {name: (forward FLOPs/image, training FLOPs/view)}."""
    counts = {}
    for name, m in (models or MODELS).items():
        fwd, train = count(build(m["arch"], m["cifar_stem"], m.get("width_mult", 1.0)), m["image_size"])
        counts[name] = (fwd, train)
        for variant, value in (("forward", fwd), ("forward+backward", train)):
            rec.add(benchmark="flops", group=f"flops {name}", variant=variant, role="measure", shape=name,
                    dtype="-", unit="GFLOP/image", value=value / 1e9)
    if torch.cuda.is_available() and not smoke:
        rate = matmul_rate(torch.device("cuda"))
        rec.add(benchmark="flops", group="matmul roofline", variant="torch.mm bf16 8192", role="measure",
                shape="8192x8192x8192", dtype="bfloat16", unit="TFLOP/s", value=rate / 1e12)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(RESULTS, "flops.jsonl"))
    args = p.parse_args(argv)
    run(Recorder(args.out))


if __name__ == "__main__":
    main()
