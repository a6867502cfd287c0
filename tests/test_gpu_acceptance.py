"""The GPU acceptance run's machine-independent part: stages, budget, failure handling and the summary, run here on
the CPU with stand-in commands (the real stages need a GPU; see benchmarks/gpu_acceptance.py)."""
import json
import subprocess
import sys

import benchmarks.gpu_acceptance as acceptance
from tests.helpers import ROOT

JUNIT = """<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="1">
<testcase classname="tests.cuda.test_gpu" name="test_a"/><testcase classname="tests.cuda.test_gpu" name="test_b">
<failure message="boom"/></testcase></testsuite></testsuites>"""


def _fake(monkeypatch, out, codes):
    """Each stage becomes a python -c that writes what the real one would and exits with codes[stage]."""
    def commands(out_dir, python=sys.executable):
        return {"env": [python, "-c", f"print('{{\"gpu\": \"fake\"}}'); raise SystemExit({codes['env']})"],
                "cuda-tests": [python, "-c", f"open({(str(out_dir) + '/cuda-tests.xml')!r}, 'w').write({JUNIT!r}); "
                                             f"raise SystemExit({codes['cuda-tests']})"],
                "benchmarks": [python, "-c", f"import time; time.sleep({codes.get('sleep', 0)}); "
                                             f"raise SystemExit({codes['benchmarks']})"]}
    monkeypatch.setattr(acceptance, "commands", commands)


def test_summary_reports_every_stage_and_fails_when_one_does(tmp_path, monkeypatch, capsys):
    _fake(monkeypatch, tmp_path, {"env": 0, "cuda-tests": 1, "benchmarks": 0})
    assert acceptance.run(str(tmp_path)) == 1
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [summary[s]["status"] for s in acceptance.STAGES] == ["passed", "failed", "passed"]
    assert "3 passed, 1 failed, 1 skipped (tests.cuda.test_gpu::test_b)" in summary["cuda-tests"]["details"]
    assert printed.strip().endswith((tmp_path / "summary.md").read_text().strip())
    assert "| env | passed |" in printed and '{"gpu": "fake"}' in printed
    for stage in acceptance.STAGES:
        assert (tmp_path / f"{stage}.log").is_file()


def test_skip_and_budget(tmp_path, monkeypatch):
    _fake(monkeypatch, tmp_path, {"env": 0, "cuda-tests": 0, "benchmarks": 0, "sleep": 30})
    assert acceptance.run(str(tmp_path), skip=("cuda-tests",), budget_s=15) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cuda-tests"]["status"] == "skipped" and summary["benchmarks"]["status"] == "timed out"


def test_command_line_refuses_unknown_stages_and_the_cuda_tests_skip_without_a_gpu(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "benchmarks.gpu_acceptance", "--out", str(tmp_path), "--skip", "x"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "invalid choice: 'x'" in bad.stderr
    cuda = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/cuda", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=ROOT)
    assert cuda.returncode == 0 and "skipped" in cuda.stdout and "failed" not in cuda.stdout
