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
from tests.helpers import DEFAULT_RECIPE, PRETRAIN
from tests.helpers import TINY as _TINY
from tests.helpers import subprocess_env
from tests.helpers import wait_for as _wait_for

TINY = _TINY + ["eval.max_eval_images=128"]


def _env(tmp_path):
    return subprocess_env()


def test_sigusr1_checkpoints_requeues_and_resumes(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "scontrol.log"
    (bindir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bindir / "scontrol").chmod(0o755)
    env = _env(tmp_path)
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="4242")
    args = [sys.executable, PRETRAIN, *TINY, "train.epochs=50",
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
    assert log.read_text().split() == ["requeue", "Incomplete", "4242"]

    again = subprocess.run(args[:2] + TINY + ["train.epochs=50", f"train.stop_at_step={steps[-1] + 2}",
                           f"logging.dir={tmp_path}/run", f"checkpoint.dir={tmp_path}/ckpt"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {tmp_path}/ckpt/{tags[-1][1]} at step {steps[-1]}" in again.stdout


KILLER = textwrap.dedent("""
    import os, signal, sys
    from fastclr import atomic
    from fastclr.config import load_config
    from tests.helpers import make_trainer
    trainer = make_trainer(load_config(sys.argv[1], sys.argv[2:]))
    trainer.train()                      # stops at train.stop_at_step with a complete checkpoint
    trainer.state.step += 1              # the next save gets killed while writing its per-rank file
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    atomic.torch_save = die
    trainer.save()
""")


def test_sigkill_during_checkpoint_write_leaves_previous_loadable(tmp_path):
    overrides = TINY + ["train.epochs=3", "train.stop_at_step=2", f"logging.dir={tmp_path}/run",
                        f"checkpoint.dir={tmp_path}/ckpt"]
    proc = subprocess.run([sys.executable, "-c", KILLER, DEFAULT_RECIPE, *overrides], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    ckpt = tmp_path / "ckpt"
    assert (ckpt / ".partial" / checkpoint.tag_for(3)).is_dir()  # the torn write is there...
    assert checkpoint.complete_tags(str(ckpt)) == [(2, checkpoint.tag_for(2))]  # ...and ignored
    assert (ckpt / "latest").read_text() == checkpoint.tag_for(2)
    assert checkpoint.resolve(str(ckpt), "auto") == (str(ckpt), checkpoint.tag_for(2))

    resumed = subprocess.run([sys.executable, PRETRAIN, *TINY,
                              "train.epochs=3", "train.stop_at_step=4", f"logging.dir={tmp_path}/run",
                              f"checkpoint.dir={ckpt}"], env=_env(tmp_path), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "at step 2" in resumed.stdout
    assert checkpoint.complete_tags(str(ckpt))[-1][0] == 4
    assert not (ckpt / ".partial" / checkpoint.tag_for(3)).exists()  # the next save cleared the torn one


def test_stop_policy_reasons_on_one_process(monkeypatch):
    from fastclr.preemption import StopPolicy, StopSignals

    policy = StopPolicy(max_minutes=0, stop_at_step=5, world_size=1, cuda=False)
    policy.start_clock()
    assert policy.reason(4) is None and policy.reason(5) == "stop_at_step"
    with StopSignals():
        pass
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # no signal: the handler is gone again
    try:
        with policy.signals:
            os.kill(os.getpid(), signal.SIGUSR1)  # recorded, not fatal, while inside
            assert policy.signals.received == "SIGUSR1" and policy.reason(6) == "signal"
        os.kill(os.getpid(), signal.SIGTERM)  # stopping on a signal: a second one (Slurm's requeue) cannot end us
        assert signal.getsignal(signal.SIGTERM) == policy.signals._handle
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    late = StopPolicy(max_minutes=1e-6, stop_at_step=0, world_size=1, cuda=False)
    late.start_clock()
    time.sleep(0.01)
    assert late.reason(1) == "deadline"


def test_exit_code_requeues_from_rank_zero_only(tmp_path, monkeypatch):
    from fastclr.preemption import PREEMPTED_EXIT_CODE
    from fastclr.tasks.common import exit_status

    def exit_code(reason, is_main):
        return exit_status({"stop_reason": reason}, is_main)

    log = tmp_path / "scontrol.log"
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert exit_code(None, True) == 0 and exit_code("deadline", True) == 0 and not log.exists()
    assert exit_code("signal", False) == PREEMPTED_EXIT_CODE and not log.exists()
    assert exit_code("signal", True) == PREEMPTED_EXIT_CODE
    assert log.read_text().split() == ["requeue", "Incomplete", "77"]


def test_every_minutes_is_due_when_the_time_since_the_last_checkpoint_is_up_on_any_rank():
    from types import SimpleNamespace

    from fastclr.cadence import Cadence
    from fastclr.preemption import StopPolicy

    policy = StopPolicy(max_minutes=0, stop_at_step=0, world_size=1, cuda=False)
    cadence = Cadence(SimpleNamespace(every_steps=0, every_epochs=0, every_minutes=0.1 / 60), steps_per_epoch=100)
    cadence.start_clock()
    policy.start_clock()
    assert policy.vote(1, cadence.minutes_up()) == (None, False)  # 0.1 s not yet over
    time.sleep(0.12)
    reason, due = policy.vote(2, cadence.minutes_up())
    assert reason is None and due and cadence.due(2, last=False, minutes_agreed=due)
    cadence.saved()  # the save happened: the clock starts again
    assert not cadence.minutes_up()
    time.sleep(0.06)
    cadence.saved()  # a checkpoint at another cadence (every_steps, epoch end) counts too
    time.sleep(0.06)
    assert not cadence.minutes_up()
    off = Cadence(SimpleNamespace(every_steps=0, every_epochs=0, every_minutes=0), steps_per_epoch=100)
    time.sleep(0.01)
    assert not off.minutes_up() and not off.due(3, last=False)
    assert not Cadence.allows(periodic=True, nonfinite_streak=2) and Cadence.allows(periodic=False, nonfinite_streak=2)


def test_cadence_of_steps_and_epochs_leaves_the_last_step_to_the_final_save():
    from types import SimpleNamespace

    from fastclr.cadence import Cadence

    c = Cadence(SimpleNamespace(every_steps=3, every_epochs=2, every_minutes=0), steps_per_epoch=5)
    due = [s for s in range(1, 21) if c.due(s, last=s == 20)]
    assert due == [3, 6, 9, 10, 12, 15, 18]  # every 3rd step, the end of epoch 2; epoch 4 ends on the last step