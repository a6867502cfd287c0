"""The GPU acceptance run, one command on a machine with a CUDA GPU (``bash benchmarks/gpu_acceptance.sh``):

1. ``env``: what the machine is (nvidia-smi, torch, CUDA, DALI, Triton);
2. ``cuda-tests``: ``pytest -m cuda tests`` — the Triton NT-Xent against fp64 at size, the DALI GPU pipeline with bad
   files, fp16 loss scaling, 30 steady steps under ``torch.cuda.set_sync_debug_mode("error")``, the compiled step;
3. ``benchmarks``: ``python -m benchmarks --quick`` on the GPU (throughput against the named baselines);

then one results folder (``--out``) with every stage's log, ``summary.json`` and ``summary.md``, and the summary
table printed last. A stage that fails does not stop the next; the exit status is 0 only if every stage passed.

    python -m benchmarks.gpu_acceptance --out DIR [--skip benchmarks] [--budget-s 480]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

STAGES = ("env", "cuda-tests", "benchmarks")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(out: str, python: str = sys.executable) -> dict[str, list[str]]:
    """The command of each stage."""
    env_probe = ("import torch, json; import nvidia.dali as d, triton; print(json.dumps({'torch': torch.__version__, "
                 "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() "
                 "else None, 'dali': d.__version__, 'triton': triton.__version__}))")
    return {
        "env": [python, "-c", env_probe],
        "cuda-tests": [python, "-m", "pytest", "-m", "cuda", "tests", "-q", "-p", "no:cacheprovider",
                       f"--junitxml={os.path.join(out, 'cuda-tests.xml')}"],
        "benchmarks": [python, "-m", "benchmarks", "--quick", "--out-dir", os.path.join(out, "benchmarks")],
    }


def junit_counts(path: str) -> dict:
    """{tests, failures, errors, skipped} of a pytest junit file, and the names of the failed tests."""
    if not os.path.isfile(path):
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def benchmark_lines(out: str) -> list[str]:
    """The comparison rows (fastclr vs baseline medians) of the benchmark run's report."""
    path = os.path.join(out, "benchmarks", "results.jsonl")
    if not os.path.isfile(path):
        return []
    sys.path.insert(0, ROOT)
    from benchmarks.report import speedups

    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [f"{s['group']}: {s['variant']} vs {s['baseline']} {s['speedup']:.2f}×" for s in speedups(rows)]


def summarize(out: str, results: dict[str, dict]) -> str:
    """The summary table (markdown), also written to ``summary.md`` and ``summary.json`` in ``out``."""
    lines = ["| stage | status | seconds | details |", "|---|---|---|---|"]
    for stage in STAGES:
        r = results.get(stage)
        if r is None:
            continue
        details = r.get("details", "")
        lines.append(f"| {stage} | {r['status']} | {r.get('seconds', 0):.0f} | {details} |")
    extra = benchmark_lines(out)
    if extra:
        lines += ["", "Benchmarks (medians, same run):", ""] + [f"- {x}" for x in extra]
    text = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(results, f, indent=1)
    return text


def _details(stage: str, out: str, proc: subprocess.CompletedProcess | None) -> str:
    if stage == "env" and proc is not None and proc.returncode == 0:
        return proc.stdout.strip().splitlines()[-1]
    if stage == "cuda-tests":
        c = junit_counts(os.path.join(out, "cuda-tests.xml"))
        if c:
            passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
            return (f"{passed} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"
                    + (f" ({', '.join(c['failed'][:5])})" if c["failed"] else ""))
    if proc is not None and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
        return f"exit {proc.returncode}: {tail[0][:160]}"
    return ""


def run(out: str, skip: tuple[str, ...] = (), budget_s: float = 480.0, python: str = sys.executable) -> int:
    os.makedirs(out, exist_ok=True)
    t_all, results = time.monotonic(), {}
    for stage, cmd in commands(out, python).items():
        if stage in skip:
            results[stage] = {"status": "skipped", "details": "--skip"}
            continue
        left = budget_s - (time.monotonic() - t_all)
        if left < 10:
            results[stage] = {"status": "not run", "details": f"the {budget_s:.0f}-s budget was spent"}
            continue
        t0, proc = time.monotonic(), None
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=left)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired as e:
            proc = subprocess.CompletedProcess(cmd, 124, e.stdout or "", e.stderr or "")
            status = "timed out"
        with open(os.path.join(out, f"{stage}.log"), "w") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout if isinstance(proc.stdout, str) else ''}"
                    f"{proc.stderr if isinstance(proc.stderr, str) else ''}")
        results[stage] = {"status": status, "seconds": time.monotonic() - t0, "command": cmd,
                          "details": _details(stage, out, proc)}
    print(summarize(out, results), flush=True)
    return 0 if all(r["status"] in ("passed", "skipped") for r in results.values()) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_acceptance", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (logs, summary.md, summary.json)")
    p.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="stages to leave out")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-time budget of all stages (default 8 min)")
    a = p.parse_args(argv)
    return run(a.out, tuple(a.skip), a.budget_s)


if __name__ == "__main__":
    sys.exit(main())
