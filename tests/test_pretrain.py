"""The entry point as users run it: bad input fails fast with a message naming it; two gloo ranks train."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import PRETRAIN as SCRIPT
from tests.helpers import ROOT, deepspeed_launcher
from tests.helpers import subprocess_env as _env


@pytest.mark.parametrize("args, env_extra, message", [
    (["data.dataset=folder", "data.path=/no/such/folder", "data.eval_path=/no/such/folder"], {},
     "'data.path': '/no/such/folder' does not exist"),
    (["model.arch=resnet51"], {}, "'model.arch': unknown model 'resnet51'"),
    (["loss.temperature=-0.5"], {}, "'loss.temperature': must be a positive number"),
    ([], {"WORLD_SIZE": "3", "RANK": "0"}, "'train.global_batch_size': 256 is not divisible by the world size 3"),
    (["precision.dtype=fp16"], {}, "'precision.dtype': fp16 needs a CUDA GPU"),
    (["--config", "/no/recipe.yaml"], {}, "config file '/no/recipe.yaml' does not exist"),
])
def test_bad_input_fails_before_compute(tmp_path, args, env_extra, message):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, SCRIPT, *args, f"logging.dir={tmp_path}/run"], env={**_env(), **env_extra},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started, nothing written
    assert time.monotonic() - t0 < 60


def test_two_gloo_ranks_with_the_deepspeed_launcher(tmp_path):
    deepspeed = deepspeed_launcher()
    args = [deepspeed, "--num_gpus", "2", "--master_port", "29577", SCRIPT, "train.epochs=2", "model.width_mult=0.125",
            "eval.probe_epochs=5", "logging.tensorboard=false", f"logging.dir={tmp_path}/run",
            f"checkpoint.dir={tmp_path}/ckpt"]
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and "RESULT kNN top-1" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["kind"] == "eval" and rows[-2]["step"] == 10


def test_a_gpu_this_torch_cannot_use_stops_the_run(tmp_path):
    """nvidia-smi answers with a GPU but torch has no CUDA (a CPU build, or a driver older than its runtime): the
    run stops naming the mismatch instead of training on the CPU; FASTCLR_DEVICE=cpu is the explicit way round."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 550.54.15'\n")
    smi.chmod(0o755)
    env = {**_env(), "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, SCRIPT, "--fields"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0  # --fields computes nothing
    proc = subprocess.run([sys.executable, SCRIPT, f"logging.dir={tmp_path}/run"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "nvidia-smi sees 1 GPU(s) (NVIDIA H200, 550.54.15)" in proc.stderr
    assert "FASTCLR_DEVICE=cpu" in proc.stderr and not (tmp_path / "run").exists()


def test_gloo_is_refused_for_gpu_ranks():
    from fastclr.config import ConfigError, load_config, validate_run

    with pytest.raises(ConfigError, match="'distributed.backend': gloo cannot carry the CUDA tensors"):
        validate_run(load_config(None, ["distributed.backend=gloo"]), 1, cuda=True)
    validate_run(load_config(None, ["distributed.backend=gloo"]), 1, cuda=None)  # a login node: the ranks decide
