"""Preemption path end to end, through real signals and real processes: SIGUSR1 → finish the step, checkpoint,
requeue, exit 3; SIGKILL in the middle of a checkpoint write → the previous checkpoint is what the next start uses."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time


from fastclr import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.width_mult=0.125", "model.proj_hidden_dim=64", "model.proj_out_dim=32", "train.global_batch_size=64",
        "train.log_every=1", "eval.probe_epochs=0", "eval.baseline=false", "logging.progress=false",
        "logging.tensorboard=false", "checkpoint.every_epochs=0", "eval.max_eval_images=128"]


def _env(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _wait_for(pred, timeout, what):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigusr1_checkpoints_requeues_and_resumes(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "scontrol.log"
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bindir / "scontrol").chmod(0o755)
    env = _env(tmp_path)
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="4242")
    args = [sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), *TINY, "train.epochs=50",
            f"logging.dir={tmp_path}/run", f"checkpoint.dir={tmp_path}/ckpt"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 240, "training to start")
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 3, out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    tags = checkpoint.complete_tags(str(tmp_path / "ckpt"))
    assert tags and tags[-1][0] == steps[-1] >= 2  # the checkpoint is the last step taken
    assert log.read_text().split() == ["requeue", "4242"]

    again = subprocess.run(args[:2] + TINY + ["train.epochs=50", f"train.stop_at_step={steps[-1] + 2}",
                           f"logging.dir={tmp_path}/run", f"checkpoint.dir={tmp_path}/ckpt"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {tmp_path}/ckpt/{tags[-1][1]} at step {steps[-1]}" in again.stdout


KILLER = textwrap.dedent("""
    import os, signal, sys
    from fastclr import checkpoint, runtime
    from fastclr.config import load_config
    from fastclr.trainer import Trainer, preflight
    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer = Trainer(cfg, runtime.setup("gloo"), preflight(cfg, 1, False))
    trainer.train()                      # stops at train.stop_at_step with a complete checkpoint
    trainer.step += 1                    # the next save gets killed while writing its per-rank file
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.atomic_torch_save = die
    trainer.save()
""")


def test_sigkill_during_checkpoint_write_leaves_previous_loadable(tmp_path):
    overrides = TINY + ["train.epochs=3", "train.stop_at_step=2", f"logging.dir={tmp_path}/run",
                        f"checkpoint.dir={tmp_path}/ckpt"]
    recipe = os.path.join(ROOT, "launchers", "configs", "default.yaml")
    proc = subprocess.run([sys.executable, "-c", KILLER, recipe, *overrides], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    ckpt = tmp_path / "ckpt"
    assert (ckpt / ".partial" / checkpoint.tag_for(3)).is_dir()  # the torn write is there...
    assert checkpoint.complete_tags(str(ckpt)) == [(2, checkpoint.tag_for(2))]  # ...and ignored
    assert (ckpt / "latest").read_text() == checkpoint.tag_for(2)
    assert checkpoint.resolve(str(ckpt), "auto") == (str(ckpt), checkpoint.tag_for(2))

    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), *TINY,
                              "train.epochs=3", "train.stop_at_step=4", f"logging.dir={tmp_path}/run",
                              f"checkpoint.dir={ckpt}"], env=_env(tmp_path), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "at step 2" in resumed.stdout
    assert checkpoint.complete_tags(str(ckpt))[-1][0] == 4
    assert not (ckpt / ".partial" / checkpoint.tag_for(3)).exists()  # the next save cleared the torn one
