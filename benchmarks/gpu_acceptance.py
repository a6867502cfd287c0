"""The GPU acceptance run, one command on a machine with one CUDA GPU, inside 8 minutes including the install
(``bash benchmarks/gpu_acceptance.sh``; ``--dry-run`` prints the plan):

1. ``install``: ``launchers/install.sh --test --bench --no-slurm`` — torch 2.13.0 built for the driver's CUDA major
   version (a CPU torch in .venv replaced), DALI for that version, DeepSpeed; no Slurm (these tests do not use it).
   Skipped when the interpreter already imports a CUDA torch and fastclr;
2. ``env``: what the machine is (nvidia-smi, torch, CUDA, DALI, Triton);
3. ``kernel-tests``: the Triton NT-Xent against fp64 — one size per dtype, a rank's shard, the memory queue, and
   past 2³¹ elements (``pytest -m cuda tests/cuda -k kernel``);
4. ``cuda-tests``: the rest of tests/cuda — DALI's GPU pipeline with bad files (screened, and reaching the GPU
   decoder), fp16 overflow steps skipped, 30 steady steps under ``torch.cuda.set_sync_debug_mode("error")``, the
   compiled step against eager (loss and gradients, TF32 off);
5. ``benchmarks``: ``python -m benchmarks --quick --only ntxent train_step`` (the kernel and the step against their
   named baselines).

Each stage has its own time budget (``BUDGETS``; a stage may also use what earlier stages left unspent) and is
killed at its limit with its results kept: the test stages write each test's outcome as it ends
(benchmarks/pytest_results.py), so a stage cut short still reports what passed, what failed and what was running.
One results folder (``--out``) holds every stage's log, ``summary.json`` and ``summary.md``; the summary table is
printed last. A stage that fails does not stop the next; the exit status is 0 only if every stage passed.

    python -m benchmarks.gpu_acceptance --out DIR [--skip benchmarks] [--dry-run]

Standard library only at import: this runs before the install it times.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
# Seconds per stage; they add up to the 8-minute budget. The install is timed like the rest: on a fresh machine
# it downloads ~3 GB (torch with its CUDA libraries, DALI) and builds DeepSpeed's wheel.
BUDGETS = {"install": 210, "env": 10, "kernel-tests": 60, "cuda-tests": 110, "benchmarks": 90}
STAGES = tuple(BUDGETS)
ENV_PROBE = ("import torch, json; import nvidia.dali as d, triton; print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() "
             "else None, 'dali': d.__version__, 'triton': triton.__version__}))")


def commands(out: str, python: str) -> dict[str, list[str]]:
    """The command of each stage (``python``: the interpreter the stages after the install use)."""
    pytest = [python, "-m", "pytest", "-m", "cuda", "tests/cuda", "-q", "-p", "no:cacheprovider", "-p",
              "benchmarks.pytest_results"]
    return {
        "install": ["bash", "launchers/install.sh", "--test", "--bench", "--no-slurm"],
        "env": [python, "-c", ENV_PROBE],
        "kernel-tests": pytest + ["-k", "kernel"],
        "cuda-tests": pytest + ["-k", "not kernel"],
        "benchmarks": [python, "-m", "benchmarks", "--quick", "--only", "ntxent", "train_step", "--out-dir",
                       os.path.join(out, "benchmarks")],
    }


def installed(python: str) -> bool:
    """Whether ``python`` already imports fastclr with a CUDA torch (then the install stage is skipped)."""
    probe = "import torch, fastclr, nvidia.dali, deepspeed; assert torch.cuda.is_available()"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_stage(cmd: list[str], timeout: float, log_path: str, env: dict) -> tuple[str, int | None, str]:
    """(status, exit code, last line of output): the stage in its own process group, killed whole at ``timeout``."""
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            status = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code, status = None, "timed out"
    lines = [x.strip() for x in open(log_path, errors="replace") if x.strip()]
    return status, code, lines[-1][:200] if len(lines) > 1 else ""


def _details(stage: str, out: str, status: str, code: int | None, last: str) -> str:
    if stage == "env" and status == "passed":
        return last
    if stage in ("kernel-tests", "cuda-tests"):
        sys.path.insert(0, ROOT)
        from benchmarks.pytest_results import read

        c = read(os.path.join(out, f"{stage}.jsonl"))
        text = f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
        if c["failed_tests"]:
            text += f" ({', '.join(c['failed_tests'][:5])})"
        if status == "timed out" and c["running"]:
            text += f"; cut short in {c['running']}"
        return text
    if status == "failed":
        return f"exit {code}: {last}"
    return ""


def benchmark_lines(out: str) -> list[str]:
    """The comparison rows (fastclr vs baseline medians) of the benchmark stage's report."""
    path = os.path.join(out, "benchmarks", "results.jsonl")
    if not os.path.isfile(path):
        return []
    sys.path.insert(0, ROOT)
    from benchmarks.report import speedups

    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [f"{s['group']}: {s['variant']} vs {s['baseline']} {s['speedup']:.2f}×" for s in speedups(rows)]


def summarize(out: str, results: dict[str, dict]) -> str:
    """The summary table (markdown), also written to ``summary.md`` and ``summary.json`` in ``out``."""
    lines = ["| stage | status | seconds | budget | details |", "|---|---|---|---|---|"]
    for stage in STAGES:
        r = results.get(stage)
        if r is not None:
            lines.append(f"| {stage} | {r['status']} | {r.get('seconds', 0):.0f} | {BUDGETS[stage]} | "
                         f"{r.get('details', '')} |")
    spent = sum(r.get("seconds", 0) for r in results.values())
    lines.append(f"| all | | {spent:.0f} | {sum(BUDGETS.values())} | |")
    try:
        extra = benchmark_lines(out)
    except Exception as e:  # noqa: BLE001 - a broken report must not lose the table
        extra = [f"(benchmark report unreadable: {type(e).__name__}: {e})"]
    if extra:
        lines += ["", "Benchmarks (medians, same run):", ""] + [f"- {x}" for x in extra]
    text = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(results, f, indent=1)
    return text


def plan_text(out: str, python: str) -> str:
    cmds = commands(out, python)
    rows = [f"{stage:<13} {BUDGETS[stage]:>4} s  {' '.join(cmds[stage])}" for stage in STAGES]
    total = sum(BUDGETS.values())
    return "\n".join(rows + [f"{'total':<13} {total:>4} s  (8 minutes: {total <= 480})"])


def run(out: str, skip: tuple[str, ...] = (), python: str | None = None, cmds: dict | None = None) -> int:
    os.makedirs(out, exist_ok=True)
    python = python or (VENV_PYTHON if os.path.exists(VENV_PYTHON) else sys.executable)
    results, spare = {}, 0.0
    if "install" not in skip and installed(python):
        results["install"] = {"status": "skipped", "details": f"{python} already has a CUDA torch and fastclr"}
        skip = skip + ("install",)
    for stage in STAGES:
        if stage in skip:
            results.setdefault(stage, {"status": "skipped", "details": "--skip"})
            continue
        if stage != "install" and not os.path.exists(python) and os.path.exists(VENV_PYTHON):
            python = VENV_PYTHON
        cmd = (cmds or commands(out, python))[stage]
        limit = BUDGETS[stage] + spare
        env = dict(os.environ, PYTHONUNBUFFERED="1", FASTCLR_TEST_RESULTS=os.path.join(out, f"{stage}.jsonl"))
        t0 = time.monotonic()
        status, code, last = run_stage(cmd, limit, os.path.join(out, f"{stage}.log"), env)
        seconds = time.monotonic() - t0
        spare = max(0.0, limit - seconds)
        results[stage] = {"status": status, "seconds": seconds, "limit_s": limit, "command": cmd,
                          "details": _details(stage, out, status, code, last)}
        if stage == "install" and status == "passed":
            python = VENV_PYTHON
    print(summarize(out, results), flush=True)
    return 0 if all(r["status"] in ("passed", "skipped") for r in results.values()) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_acceptance", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "gpu-acceptance-" + time.strftime("%Y%m%dT%H%M%S")),
                   help="results folder (logs, summary.md, summary.json)")
    p.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="stages to leave out")
    p.add_argument("--python", default=None, help="interpreter of the stages (default: .venv's, else this one)")
    p.add_argument("--dry-run", action="store_true", help="print the stages, their budgets and commands; run nothing")
    a = p.parse_args(argv)
    if a.dry_run:
        print(plan_text(a.out, a.python or VENV_PYTHON))
        return 0
    return run(a.out, tuple(a.skip), a.python)


if __name__ == "__main__":
    sys.exit(main())
