"""The installed command line: ``fastclr``, ``fastclr pretrain`` (help, fields, recipes), and the resolved config a
run writes, which is itself a recipe."""
import json
import subprocess
import sys

import torch
import yaml

from fastclr.cli import main
from fastclr.config import load_config
from tests.helpers import ROOT, subprocess_env, tiny_config


def _fastclr(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastclr", *args], capture_output=True, text=True, cwd=cwd,
                          env=subprocess_env(), timeout=timeout)


def test_help_lists_the_commands_and_the_config_sections():
    top = _fastclr("--help")
    assert top.returncode == 0 and "pretrain" in top.stdout and "data" in top.stdout
    pre = _fastclr("pretrain", "--help")
    assert pre.returncode == 0
    for section in ("data", "model", "loss", "optim", "train", "precision", "distributed", "checkpoint", "logging",
                    "eval"):
        assert section in pre.stdout
    assert "config" in pre.stdout and "--fields" in pre.stdout and "cifar10_resnet18" in pre.stdout


def test_fields_prints_every_field_with_its_default_and_doc(capsys):
    assert main(["pretrain", "--fields"]) == 0
    out = capsys.readouterr().out
    assert "  optim.base_lr = 0.3  — Base LR" in out and "[data.augment]" in out
    assert "  data.augment.crop_area = [0.08, 1.0]" in out


def test_the_deepspeed_launchers_local_rank_argument_is_accepted(capsys):
    assert main(["--local_rank=0", "pretrain", "--fields"]) == 0
    assert "train.epochs" in capsys.readouterr().out


def test_shipped_recipes_load_by_name():
    assert load_config("cifar10_resnet18", ["data.path=train"]).data.image_size == 32
    assert load_config("default").data.dataset == "digits"


def test_written_config_is_a_recipe_that_reproduces_the_run(tmp_path):
    """A run writes <logging.dir>/config.yaml; `fastclr pretrain --config` on it gives the same first 5 losses and
    bit-identical parameters.

    The losses are compared to 1e-5 relative, not bit for bit: in about 1 launch in 12 the *logged* fp32 loss of the
    first step differs by ~3e-6 relative (the log-sum-exp of the first view's anchors against each other, from the
    CPU GEMM of the embeddings with themselves), while every parameter after the step is bit-identical (the
    difference does not survive the bf16 backward) — measured over 14 launches of this very run."""
    first = _fastclr("pretrain", "--config", "default", *tiny_args(tmp_path / "a"), "train.stop_at_step=5")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    written = tmp_path / "a" / "config.yaml"
    assert load_config(str(written)) == tiny_config(tmp_path / "a", "train.stop_at_step=5")
    assert yaml.safe_load(written.read_text())["train"]["stop_at_step"] == 5
    again = _fastclr("pretrain", "--config", str(written), f"logging.dir={tmp_path}/b",
                     f"checkpoint.dir={tmp_path}/b/ckpt", cwd=str(tmp_path))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]

    def losses(run):
        rows = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    assert len(losses("a")) == 5
    for x, y in zip(losses("b"), losses("a")):
        assert abs(x - y) <= 1e-5 * abs(y), (losses("a"), losses("b"))

    def params(run):
        [path] = (tmp_path / run / "ckpt").glob("step*/mp_rank_00_model_states.pt")
        return torch.load(path, weights_only=False)["module"]

    a, b = params("a"), params("b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tiny_args(run_dir):
    from tests.helpers import TINY

    return TINY + [f"logging.dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt"]


def test_an_installed_package_pretrains_outside_the_checkout(tmp_path):
    """`pip install .` (here into a target folder, without dependencies) carries the recipes as package data:
    `fastclr pretrain` runs from a folder that has no checkout."""
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), ROOT], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (target / "fastclr" / "recipes" / "default.yaml").is_file() and (target / "fastclr_kernels").is_dir()
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    run = subprocess.run([sys.executable, "-m", "fastclr", "pretrain", *tiny_args(tmp_path / "run"),
                          "train.stop_at_step=2"], capture_output=True, text=True, cwd=str(tmp_path), env=env,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"{target}/fastclr" in subprocess.run(
        [sys.executable, "-c", "import fastclr; print(fastclr.__file__)"], capture_output=True, text=True,
        cwd=str(tmp_path), env=env).stdout
    assert "RESULT kNN top-1" in run.stdout
