"""The benchmark suite: its baselines compute what fastclr computes, and its smallest run produces a complete report
where every baseline ran beside its fastclr counterpart."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.common import ROLES, SCHEMA
from benchmarks.plain_simclr import PlainLARS, Step, plain_nt_xent
from fastclr.losses import nt_xent
from fastclr.optim import LARS, param_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("n, d, tau", [(7, 5, 0.3), (33, 129, 0.07), (1, 3, 0.5)])
def test_plain_nt_xent_is_the_same_loss(n, d, tau):
    g = torch.Generator().manual_seed(n * d)
    za = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    zb = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    ours = nt_xent(za, zb, tau, impl="naive")
    (ga, gb) = torch.autograd.grad(ours, (za, zb))
    plain = plain_nt_xent(za.double(), zb.double(), tau)
    (pa, pb) = torch.autograd.grad(plain, (za, zb))
    torch.testing.assert_close(plain.double(), ours.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pa.double(), ga.double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(pb.double(), gb.double(), rtol=1e-4, atol=1e-7)


def test_plain_lars_takes_the_same_steps_as_fastclr_lars():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Flatten(),
                                torch.nn.Linear(5 * 6 * 6, 7))
    twin = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    ours = LARS(param_groups(model, 1e-4), lr=0.7, momentum=0.9, trust_coefficient=1e-3, eps=0.0)
    groups = [torch.nn.Parameter(t) for t in twin]
    plain = PlainLARS(groups, lr=0.7, momentum=0.9, weight_decay=1e-4, eta=1e-3)
    for step in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for p, q, gr in zip(model.parameters(), groups, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        plain.step()
        for p, q in zip(model.parameters(), groups):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7)


def test_ablation_steps_switch_on_what_they_name():
    from benchmarks.flops import build

    model = build("resnet18", cifar_stem=True, width_mult=0.125, hidden=32, out=16)
    step = Step(model, on=("channels_last", "multi_tensor_lars"))
    assert isinstance(step.opt, LARS)
    assert step.model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    loss = step(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="unknown techniques"):
        Step(model, on=("fp8",))


def test_smallest_suite_run_reports_every_baseline_beside_fastclr(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    assert rows
    for r in rows:
        missing = [k for k in SCHEMA if k not in r]
        assert not missing, (missing, r)
        assert r["role"] in ROLES
        assert isinstance(r["median"], (int, float)) and r["p25"] <= r["median"] <= r["p75"] and r["repeats"] >= 1
        assert r["commit"] == rows[0]["commit"] and r["timestamp"] == rows[0]["timestamp"]
    assert {r["benchmark"] for r in rows} == {"flops", "ntxent", "lars", "data", "train_step", "breakdown", "scaling"}
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    compared = [g for g, rs in groups.items() if any(r["role"] == "baseline" for r in rs)]
    for g in compared:  # every baseline has its fastclr counterpart in the same group, on the same workload
        rs = groups[g]
        fast = [r for r in rs if r["role"] == "fastclr"]
        assert fast, f"group {g} has a baseline but no fastclr row"
        assert len({(r["shape"], r["unit"]) for r in rs}) == 1, g
    variants = {(r["benchmark"], r["variant"]) for r in rows}
    for expected in [("train_step", "plain-pytorch"), ("train_step", "fastclr"), ("train_step", "+channels_last"),
                     ("train_step", "+bf16"), ("train_step", "+tiled_loss"), ("train_step", "+multi_tensor_lars"),
                     ("train_step", "plain-pytorch + pil-dataloader"), ("train_step", "fastclr + dali"),
                     ("data", "fastclr-dali"), ("data", "pil-dataloader"), ("data", "kornia-cpu"),
                     ("lars", "multi-tensor"), ("lars", "per-parameter loop"), ("lars", "same-kernel loop"),
                     ("ntxent", "naive"), ("ntxent", "tiled")]:
        assert expected in variants, expected
    phases = {r["variant"] for r in rows if r["benchmark"] == "breakdown"}
    assert {"data", "forward", "loss", "backward", "comm", "optimizer"} <= phases
    report = (out / "report.md").read_text()
    for heading in ("Against the baselines", "train_step", "data", "Step breakdown", "Scaling model",
                    "Check against the measured 2-rank CPU run"):
        assert heading in report, heading
    for png in ("train_step.png", "data.png", "ntxent.png", "lars.png", "breakdown.png", "scaling.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "summary (fastclr vs baseline, same run)" in proc.stdout


def test_gpu_time_to_accuracy_command_runs_its_cpu_smoke(tmp_path, shared_data):
    """``python -m benchmarks --only tta --recipe cifar10_resnet18_gpu``: on one GPU the 10-minute run against the
    published 84.7% kNN; here, with no GPU, the same command, recipe, loader (all 50,000 training JPEGs), budget and
    kNN as a 1-minute smoke. Held: the published mark and fastclr's final kNN side by side, the run inside its budget
    (training seconds ≤ 60 + 10%), a kNN above chance on the held-out images, the curve plotted."""
    from benchmarks.tta import CPU_SMOKE, PUBLISHED

    assert not torch.cuda.is_available()
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "tta", "--recipe", "cifar10_resnet18_gpu",
                           "--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    knn = {r["variant"]: r for r in rows if r["unit"] == "% kNN top-1"}
    assert knn[PUBLISHED["name"]]["median"] == 84.7 and knn[PUBLISHED["name"]]["published"]
    fast = knn["fastclr"]
    assert "CPU smoke" in fast["group"] and " ".join(CPU_SMOKE[:3]) in fast["group"]
    assert 10.0 < fast["median"] <= 100.0  # 10 classes: chance is 10%
    assert 0 < fast["curve"][-1][0] <= 66.0, fast["curve"]
    assert (out / "tta.png").stat().st_size > 1000


def test_data_index_benchmark_measures_cold_and_warm_starts_of_two_ranks(tmp_path):
    """``python -m benchmarks --only data_index`` at its smoke size: generated shards and folders, two fresh ranks
    per start, the cold start finds no index and builds it, the warm start finds it; memory per sample over the
    3-shard baseline and the read-ahead rate are reported."""
    from benchmarks import data_index
    from benchmarks.common import Recorder

    result = data_index.run(Recorder(None, quiet=True), smoke=True, data_dir=str(tmp_path), ranks=(2,))
    starts = result["starts"]
    assert [(r["kind"], r["samples"], r["cold"]) for r in starts] == [
        ("tar", 3000, True), ("tar", 3000, False), ("tar", 4000, True), ("tar", 4000, False), ("folder", 4000, True),
        ("folder", 4000, False)]  # the baseline: 3 of the 4 shards of 1,000
    for r in starts:
        assert r["cached"] is not r["cold"] and r["start_s"] > 0 and r["rss_epoch"] > 0
    assert result["read_ahead"]["images_per_s"] > 0 and result["read_ahead"]["mean_kb"] > 50
    data_index.plot(result, str(tmp_path / "data_index.png"))
    assert (tmp_path / "data_index.png").stat().st_size > 0 and len(data_index.summary(result)) == 7
