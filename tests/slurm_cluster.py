"""A real two-node Slurm cluster on this machine (launchers/slurm/local_cluster.sh: munged, slurmctld, slurmd node1
and node2 from Debian's packages, in a temporary folder, on free ports at 127.0.0.1), and what the real-cluster tests
do with it: submit through launchers/slurm/submit.py, read job states, find a job's rank processes, wait."""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from tests.helpers import ROOT, subprocess_env

SCRIPT = os.path.join(ROOT, "launchers", "slurm", "local_cluster.sh")
SUBMIT = os.path.join(ROOT, "launchers", "slurm", "submit.py")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE")


def unavailable() -> str | None:
    """Why the local cluster cannot run here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return (f"Slurm's packages are not installed ({', '.join(missing)} missing); `bash launchers/install.sh "
                "--test` installs slurm-wlm and munge as root on Debian/Ubuntu")
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root: slurmd starts job processes as the submitting user"
    return None


def job_env(**extra) -> dict:
    """The environment jobs are submitted with (sbatch --export=ALL hands it to every rank), and that the reference
    runs outside Slurm use too. The batch script activates .venv, putting its ninja first on PATH; DeepSpeed's CPU
    op is rebuilt (~35 s) whenever the ninja that built it changes, so these runs share one PATH and keep their build
    in a folder of their own, apart from the rest of the suite's."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    env["TORCH_EXTENSIONS_DIR"] = os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                                               "fastclr-slurm-tests")
    env["OMP_NUM_THREADS"] = "1"  # what the ranks get under Slurm (1 CPU per task): the same arithmetic everywhere
    return {**env, **extra}


class Cluster:
    """The running cluster: its folder, the environment its clients need, and job helpers."""

    def __init__(self, state_dir: str):
        self.dir = state_dir
        self.env = job_env(SLURM_CONF=os.path.join(state_dir, "slurm.conf"))
        self._up = False

    def up(self) -> "Cluster":
        t0 = time.monotonic()
        r = subprocess.run(["bash", SCRIPT, "up", self.dir], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            self.down()
            raise RuntimeError(f"local cluster did not start:\n{r.stdout}\n{r.stderr}")
        self._up = True
        self.start_s = time.monotonic() - t0
        atexit.register(self.down)  # also when pytest is interrupted before the fixture's teardown runs
        return self

    def down(self) -> None:
        if os.path.isdir(self.dir):
            subprocess.run(["bash", SCRIPT, "down", self.dir], capture_output=True, text=True, timeout=120)
        self._up = False

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def submit(self, *args: str) -> int:
        """Submit through launchers/slurm/submit.py (which runs the real sbatch); the job id."""
        r = self.run(sys.executable, SUBMIT, *args, timeout=120)
        m = re.search(r"Submitted batch job (\d+)", r.stdout)
        assert m, r.stdout + r.stderr
        return int(m.group(1))

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, until, timeout: float, what: str) -> dict[str, str]:
        """Poll the job every 0.2 s until ``until(fields)``; the fields then."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            fields = self.job(job_id)
            if until(fields):
                return fields
            time.sleep(0.2)
        raise AssertionError(f"job {job_id}: timed out after {timeout:.0f} s waiting for {what}; last {fields}")

    def wait_finished(self, job_id: int, timeout: float) -> dict[str, str]:
        return self.wait(job_id, lambda f: f.get("JobState") in FINISHED, timeout, "it to finish")

    def rank_pids(self, job_id: int) -> dict[int, int]:
        """{global rank: pid} of the trainer processes of the job, read from /proc (ranks on both "nodes")."""
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if env.get(b"SLURM_JOB_ID") == str(job_id).encode() and b"RANK" in env and b"pretrain.py" in cmd:
                found[int(env[b"RANK"])] = int(pid)
        return found

    def clean(self) -> None:
        """Cancel every job, so that a failed test leaves the next one an idle cluster."""
        self.run("scancel", "--user", str(os.getuid()), check=False)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90:
            if not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                return
            time.sleep(0.5)


def alive(pid: int) -> bool:
    """Running or stopped, not a zombie or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` has exited (raises after ``timeout``)."""
    t0 = time.monotonic()
    while alive(pid):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"pid {pid} still alive after {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - t0


def kill(pid: int, sig: signal.Signals) -> float:
    """Send ``sig``; the monotonic time it was sent."""
    os.kill(pid, sig)
    return time.monotonic()
