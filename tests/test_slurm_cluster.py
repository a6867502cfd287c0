"""The real chain on a real Slurm cluster: launchers/slurm/submit.py → sbatch → launchers/slurm/pretrain.sbatch →
srun → the trainer, on CPU with gloo, 2 nodes × 1 rank and 1 node × 2 ranks (tests/slurm_cluster.py starts the
cluster from Debian's slurm-wlm and munge), with the faults a cluster brings: preemption, the time limit, an
operator's requeue, a cancel, a rank killed, a rank stopped; and SimCLR v2 as three chained jobs (pretrain →
finetune → distill), each preempted once. Each run is the embedded digits with a tiny network (44 steps of 64
images); the reference is the same 2-rank run under the deepspeed launcher outside Slurm, and every job that
finishes must end on its parameters bit for bit, however often it was interrupted and resumed."""
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time

import pytest
import torch

from fastclr import checkpoint
from fastclr.runtime import free_port
from tests.helpers import PRETRAIN, ROOT, TINY, deepspeed_launcher, wait_for
from tests.slurm_cluster import Cluster, alive, job_env, kill, unavailable, wait_gone

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

STEPS = 44  # 2 epochs of 22 steps
TIMEOUT_S = 15  # distributed.timeout of these runs: what a hung rank costs its peers
BASE = TINY + ["eval.max_eval_images=128", "train.epochs=2", f"distributed.timeout={TIMEOUT_S}"]


def overrides(run_dir, *extra):
    return BASE + [f"logging.dir={run_dir}/run", f"checkpoint.dir={run_dir}/ckpt", *extra]


@pytest.fixture(scope="module")
def cluster():
    # Not under pytest's basetemp: munged wants every folder above its socket searchable by all, and that one is 0700.
    c = Cluster(tempfile.mkdtemp(prefix="fastclr-slurm-"))
    c.up()
    print(f"\nmeasured: local cluster up in {c.start_s:.1f} s")
    try:
        yield c
    finally:
        c.clean()
        c.down()
        shutil.rmtree(c.dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _idle_cluster_after(request):
    yield
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").clean()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The same 2-rank run started with the deepspeed launcher on this machine, outside Slurm: its folder."""
    d = tmp_path_factory.mktemp("reference")
    t0 = time.monotonic()
    proc = subprocess.run([deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()), PRETRAIN,
                           *overrides(d)], env=job_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\nmeasured: reference run (deepspeed launcher, 2 ranks) {time.monotonic() - t0:.0f} s")
    return d


@pytest.fixture(scope="module")
def reference(reference_run):
    """Final parameters of the reference run."""
    return final_params(reference_run / "ckpt", STEPS)


def seconds_per_step(run_dir):
    """Median wall time of one training step in a finished run (every step is logged; the first three skipped)."""
    times = [r["time"] for r in train_rows(run_dir)][3:]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def submit(cluster, run_dir, nodes, ranks, *extra, time_limit="10:00", sbatch=()):
    return cluster.submit("--recipe", "default", "--nodes", str(nodes), "--gpus-per-node", str(ranks), "--cpu",
                          "--cpus-per-task", "1", "--time", time_limit, *(f"--sbatch-arg={a}" for a in sbatch),
                          *overrides(run_dir, *extra))


def final_params(ckpt_dir, step):
    tags = checkpoint.complete_tags(str(ckpt_dir))
    assert tags and tags[-1][0] == step, tags
    return torch.load(os.path.join(ckpt_dir, tags[-1][1], "mp_rank_00_model_states.pt"), weights_only=False)["module"]


def assert_same(params, reference):
    assert params.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(params[k], reference[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


def slurm_log(run_dir, job_id):
    return (run_dir / "run" / f"slurm-{job_id}.out").read_text()


def tasks_exited(log, code):
    """The srun tasks that exited with ``code`` ("task 0: Exited ..." or "tasks 0-1: Exited ...")."""
    out = set()
    for a, b in re.findall(rf"tasks? (\d+)(?:-(\d+))?: Exited with exit code {code}\b", log):
        out.update(range(int(a), int(b or a) + 1))
    return out


def train_rows(run_dir):
    path = run_dir / "run" / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def assert_checkpoints_intact(ckpt_dir):
    """Every checkpoint in place is complete and matches its marker's checksums; ``latest`` names the newest."""
    tags = checkpoint.complete_tags(str(ckpt_dir))
    assert tags
    for _, tag in tags:
        assert checkpoint.verify(str(ckpt_dir / tag)) == [], tag
    assert (ckpt_dir / "latest").read_text() == tags[-1][1]
    assert {p.name for p in ckpt_dir.iterdir()} <= {t for _, t in tags} | {"latest", ".partial"}


class LatestWatcher:
    """Polls ``latest`` every 20 ms while a job runs: each checkpoint it ever names must be complete and intact."""

    def __init__(self, ckpt_dir):
        self.ckpt_dir, self.seen, self.bad, self._stop = ckpt_dir, set(), [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                tag = (self.ckpt_dir / "latest").read_text()
            except OSError:
                tag = None
            if tag and tag not in self.seen:
                self.seen.add(tag)
                problems = checkpoint.verify(str(self.ckpt_dir / tag))
                if problems and (self.ckpt_dir / tag).exists():  # (pruned in between: it was complete when named)
                    self.bad.append((tag, problems))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------------------- #
# Jobs that end well


def test_a_job_that_finishes_equals_the_deepspeed_launcher(cluster, reference, tmp_path):
    t0 = time.monotonic()
    job = submit(cluster, tmp_path, nodes=2, ranks=1)
    fields = cluster.wait_finished(job, 400)
    wall = time.monotonic() - t0
    log = slurm_log(tmp_path, job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-3000:]
    assert fields["NodeList"] == "node[1-2]" and fields["NumNodes"] == "2"
    assert "node 0 node1: ranks 0-0" in log and "node 1 node2: ranks 1-1" in log and "RESULT kNN top-1" in log
    assert_same(final_params(tmp_path / "ckpt", STEPS), reference)
    print(f"\nmeasured: finished job, 2 nodes x 1 rank: {wall:.0f} s")


STAGES = {
    "finetune": ["finetune.epochs=10", "finetune.global_batch_size=32", "finetune.log_every=1"],  # 140 labels: 40 steps
    "distill": ["distill.epochs=2", "distill.warmup_epochs=0.5", "distill.global_batch_size=64",  # 44 steps
                "distill.log_every=1"],
}


@pytest.fixture(scope="module")
def reference_stages(reference_run):
    """Final parameters of finetune and distill after the reference pretraining, each uninterrupted, 2 ranks under
    the deepspeed launcher outside Slurm: {stage: parameters}."""
    out, t0 = {}, time.monotonic()
    sources = {"finetune": reference_run / "ckpt", "distill": reference_run / "run" / "finetune" / "classifier.pt"}
    for stage in ("finetune", "distill"):
        proc = subprocess.run([deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(free_port()),
                               os.path.join(ROOT, "launchers", "stage.py"), stage, str(sources[stage]),
                               f"logging.dir={reference_run / 'run'}", *STAGES[stage]],
                              env=job_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[stage] = stage_params(reference_run / "run" / stage / "checkpoints")
    print(f"\nmeasured: reference finetune + distill (deepspeed launcher, 2 ranks) {time.monotonic() - t0:.0f} s")
    return out


def stage_params(ckpt_dir):
    tags = checkpoint.complete_tags(str(ckpt_dir))
    return torch.load(os.path.join(ckpt_dir, tags[-1][1], "mp_rank_00_model_states.pt"), weights_only=False)["module"]


def stage_rows(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"] if path.exists() else []


def test_the_v2_pipeline_as_three_chained_jobs_each_preempted_ends_bit_identical(cluster, reference, reference_stages,
                                                                                  tmp_path):
    """pretrain → finetune (10% of the labels) → distill, submitted at once as three jobs chained with --after
    (afterok), each stage sent USR1 (what Slurm's preemption warning does) after 10 steps: every rank finishes its
    step, checkpoints and exits 3, the job requeues, resumes there, and the stage ends on the parameters of the
    same stage run uninterrupted, bit for bit."""
    t0, run = time.monotonic(), tmp_path / "run"
    jobs = {"pretrain": submit(cluster, tmp_path, nodes=1, ranks=2)}
    sources = {"finetune": tmp_path / "ckpt", "distill": run / "finetune" / "classifier.pt"}
    for stage, after in (("finetune", "pretrain"), ("distill", "finetune")):
        jobs[stage] = cluster.submit("--task", stage, "--source", str(sources[stage]), "--after", str(jobs[after]),
                                     "--nodes", "1", "--gpus-per-node", "2", "--cpu", "--cpus-per-task", "1",
                                     "--time", "10:00", f"logging.dir={run}", *STAGES[stage])
    metrics = {"pretrain": run / "metrics.jsonl", "finetune": run / "finetune" / "metrics.jsonl",
               "distill": run / "distill" / "metrics.jsonl"}
    walls = {}
    for stage, job in jobs.items():
        wait_for(lambda: len(stage_rows(metrics[stage])) >= 10, 400, f"10 {stage} steps")
        cluster.run("scancel", "--signal=USR1", "--full", str(job))
        fields = cluster.wait_finished(job, 400)
        walls[stage] = time.monotonic() - t0
        log = (run if stage == "pretrain" else run / stage).joinpath(f"slurm-{job}.out").read_text()
        assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-3000:]
        assert f"fastclr: job {job} start 1 on" in log  # SLURM_RESTART_COUNT=1 in the second start
        stop = int(re.search(r"signal SIGUSR1 received: checkpoint at step (\d+) written", log).group(1))
        assert stop >= 10 and tasks_exited(log, 3) == {0, 1}  # both ranks checkpointed and exited 3
        ckpt = tmp_path / "ckpt" if stage == "pretrain" else run / stage / "checkpoints"
        assert f"resumed from {ckpt / checkpoint.tag_for(stop)} at step {stop}," in log
        assert_same(final_params(ckpt, STEPS) if stage == "pretrain" else stage_params(ckpt),
                    reference if stage == "pretrain" else reference_stages[stage])
        t0 = time.monotonic()
    print("\nmeasured: v2 chain, 1 node x 2 ranks, USR1 in each stage, requeue, resume, bit-identical: " +
          ", ".join(f"{s} {w:.0f} s" for s, w in walls.items()))


def test_the_time_limit_warning_checkpoints_and_requeues_before_the_limit(cluster, reference_run, tmp_path):
    """--time=2 with --signal=USR1@60: Slurm tests limits every 30 s, so the warning comes 60–90 s before the limit,
    30–60 s after the start. The run is sized from this machine's measured step time to ≥ 90 s of training (≥ 10
    epochs), so it cannot end in one start on any machine: every start but the last must end on the warning with a
    checkpoint, and the next must resume exactly there; none may reach the limit (TIMEOUT: killed, maybe
    mid-write)."""
    epochs = max(10, math.ceil(90 / seconds_per_step(reference_run) / (STEPS // 2)))
    t0 = time.monotonic()
    job = submit(cluster, tmp_path, 2, 1, f"train.epochs={epochs}", time_limit="2", sbatch=["--signal=USR1@60"])
    fields = cluster.wait_finished(job, 900)
    wall = time.monotonic() - t0
    log = slurm_log(tmp_path, job)
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    stops = re.findall(r"signal SIGUSR1 received: checkpoint at step (\d+) written", log)
    resumes = re.findall(r"resumed from \S+ at step (\d+),", log)
    assert stops and stops == resumes and int(fields["Restarts"]) == len(stops), (stops, resumes, fields)
    assert "TIME LIMIT" not in log and "TIMEOUT" not in log
    assert_checkpoints_intact(tmp_path / "ckpt")
    assert checkpoint.complete_tags(str(tmp_path / "ckpt"))[-1][0] == epochs * STEPS // 2
    print(f"\nmeasured: time-limit job (--time=2, USR1@60, {epochs} epochs): {len(stops)} requeue(s) at steps "
          f"{stops}, {wall:.0f} s")


def test_an_operators_requeue_resumes_from_a_complete_checkpoint(cluster, reference, tmp_path):
    t0 = time.monotonic()
    job = submit(cluster, tmp_path, 1, 2, "checkpoint.every_steps=5")
    with LatestWatcher(tmp_path / "ckpt") as watcher:
        wait_for(lambda: len(train_rows(tmp_path)) >= 12, 300, "12 training steps")
        cluster.run("scontrol", "requeue", str(job))  # SIGTERM to every rank, SIGKILL KillWait (30 s) later
        fields = cluster.wait_finished(job, 400)
    wall = time.monotonic() - t0
    log = slurm_log(tmp_path, job)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-3000:]
    stop = int(re.search(r"signal SIGTERM received: checkpoint at step (\d+) written", log).group(1))
    assert f"at step {stop}," in log.split("start 1 on")[1]
    assert not watcher.bad and len(watcher.seen) >= 3, (watcher.bad, watcher.seen)
    assert_same(final_params(tmp_path / "ckpt", STEPS), reference)
    print(f"\nmeasured: operator requeue at step {stop}, resume, finish: {wall:.0f} s")


def test_a_cancelled_job_leaves_only_complete_checkpoints_and_stays_cancelled(cluster, tmp_path):
    t0 = time.monotonic()
    job = submit(cluster, tmp_path, 2, 1, "checkpoint.every_steps=5")
    with LatestWatcher(tmp_path / "ckpt") as watcher:
        wait_for(lambda: len(train_rows(tmp_path)) >= 12, 300, "12 training steps")
        cluster.run("scancel", str(job))
        fields = cluster.wait_finished(job, 120)
        time.sleep(3)  # rank 0's requeue call came too late for a cancelled job: it must stay cancelled
    fields = cluster.job(job)
    wall = time.monotonic() - t0
    assert fields["JobState"] == "CANCELLED" and fields["Restarts"] == "0", fields
    assert not watcher.bad and watcher.seen, (watcher.bad, watcher.seen)
    assert_checkpoints_intact(tmp_path / "ckpt")
    log = slurm_log(tmp_path, job)
    stop = re.search(r"signal SIGTERM received: checkpoint at step (\d+) written", log)
    if stop:  # the ranks wrote their last checkpoint before Slurm's SIGKILL: it is the newest
        assert checkpoint.complete_tags(str(tmp_path / "ckpt"))[-1][0] == int(stop.group(1))
    print(f"\nmeasured: cancel at step ~12: {wall:.0f} s")


# --------------------------------------------------------------------------------------------------------------- #
# A rank that dies, a rank that hangs


def _kill_a_rank_mid_run(cluster, tmp_path, nodes, ranks, sig):
    """Start a job with a checkpoint every 3 s, send ``sig`` to rank 1 after a checkpoint, and measure how long rank 0
    takes to exit; the job must then requeue itself (a checkpoint was completed in that start) and finish."""
    job = submit(cluster, tmp_path, nodes, ranks, "checkpoint.every_minutes=0.05")
    wait_for(lambda: checkpoint.complete_tags(str(tmp_path / "ckpt")) and len(train_rows(tmp_path)) >= 20, 300,
             "a time-based checkpoint and 20 steps")
    pids = cluster.rank_pids(job)
    assert sorted(pids) == [0, 1], pids
    sent = kill(pids[1], sig)
    wait_gone(pids[0], TIMEOUT_S + 30)
    survivor_s = time.monotonic() - sent
    victim_s = wait_gone(pids[1], 2 * TIMEOUT_S + 30) if alive(pids[1]) else 0.0  # after the survivor's exit
    fields = cluster.wait_finished(job, 400)
    log = slurm_log(tmp_path, job)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-4000:]
    assert "rank 0 of 2: a collective failed: a peer rank died or stopped answering" in log
    assert "was completed in this start; requeueing job" in log
    resumed = int(re.search(r"resumed from \S+ at step (\d+),", log).group(1))
    rows = train_rows(tmp_path)
    # The second start logs step resumed + 1 first; the first start may or may not have logged it before the kill.
    first_start = rows[:max(i for i, r in enumerate(rows) if r["step"] == resumed + 1)]
    lost_steps = first_start[-1]["step"] - resumed
    lost_s = first_start[-1]["time"] - next(r["time"] for r in first_start if r["step"] == resumed)
    return survivor_s, victim_s, lost_steps, lost_s, log


def test_a_killed_rank_stops_its_peer_at_once_and_the_requeued_job_resumes(cluster, reference, tmp_path):
    survivor_s, _, lost_steps, lost_s, log = _kill_a_rank_mid_run(cluster, tmp_path, 2, 1, signal.SIGKILL)
    assert survivor_s < TIMEOUT_S, survivor_s  # gloo sees the closed socket; no need to wait for the timeout
    assert "Connection reset by peer" in log or "Connection closed by peer" in log
    assert lost_s <= 3 + 5, lost_s  # checkpoint.every_minutes=0.05 (3 s), plus the step that crossed it
    assert_same(final_params(tmp_path / "ckpt", STEPS), reference)
    print(f"\nmeasured: SIGKILL of rank 1: rank 0 exited {survivor_s:.2f} s later; requeued job lost {lost_steps} "
          f"steps = {lost_s:.1f} s of training (checkpoint.every_minutes = 0.05)")


@pytest.mark.slow  # ~95 s: keeps the default suite under 20 minutes on 2 cores
def test_a_stopped_rank_times_its_peer_out_and_is_killed_by_srun(cluster, reference, tmp_path):
    survivor_s, victim_s, lost_steps, lost_s, log = _kill_a_rank_mid_run(cluster, tmp_path, 1, 2, signal.SIGSTOP)
    assert TIMEOUT_S - 1 <= survivor_s <= TIMEOUT_S + 10, survivor_s  # distributed.timeout, not forever
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in log
    assert victim_s <= TIMEOUT_S + 15, victim_s  # srun --wait=<distributed.timeout> after the peer ended
    assert_checkpoints_intact(tmp_path / "ckpt")
    assert_same(final_params(tmp_path / "ckpt", STEPS), reference)
    print(f"\nmeasured: SIGSTOP of rank 1: rank 0 exited {survivor_s:.1f} s later (distributed.timeout = "
          f"{TIMEOUT_S} s), srun killed rank 1 {victim_s:.1f} s after that; requeued job lost {lost_steps} steps = "
          f"{lost_s:.1f} s")
