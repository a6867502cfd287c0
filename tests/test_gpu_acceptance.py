"""The GPU acceptance run's machine-independent part: the plan and its budget, stage limits that keep results, the
per-test result lines, failure handling and the summary — run here on the CPU with stand-in commands (the real
stages need a GPU; see benchmarks/gpu_acceptance.py)."""
import json
import subprocess
import sys

import benchmarks.gpu_acceptance as acceptance
from benchmarks.pytest_results import read
from tests.helpers import ROOT


def test_dry_run_prints_every_stage_inside_eight_minutes_with_the_install():
    proc = subprocess.run(["bash", "benchmarks/gpu_acceptance.sh", "--dry-run"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    budgets = {line.split()[0]: int(line.split()[1]) for line in lines}
    assert list(budgets)[:-1] == list(acceptance.STAGES) and budgets["install"] > 0
    assert sum(v for k, v in budgets.items() if k != "total") == budgets["total"] <= 480
    install = next(line for line in lines if line.startswith("install"))
    assert "--no-slurm" in install and "--test" in install  # the CUDA tests' install leaves Slurm out
    assert "-k kernel" in proc.stdout and "-k not kernel" in proc.stdout


def _stage(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _fake_tests(results: str, outcomes: list[tuple[str, str]], hang: bool = False, code: int = 0) -> list[str]:
    """A stand-in test stage: writes result lines as the plugin does, then exits (or hangs in a last test)."""
    lines = []
    for name, outcome in outcomes:
        lines += [{"test": name, "event": "start"}, {"test": name, "event": "outcome", "outcome": outcome}]
    if hang:
        lines.append({"test": "tests/cuda/test_gpu.py::test_slow", "event": "start"})
    body = f"import json, time\nf = open({results!r}, 'a')\n"
    body += "".join(f"f.write(json.dumps({x!r}) + '\\n')\n" for x in lines) + "f.flush()\n"
    body += "time.sleep(60)\n" if hang else f"raise SystemExit({code})\n"
    return _stage(body)


def test_stages_report_and_a_stage_at_its_limit_keeps_its_results(tmp_path, monkeypatch):
    out = str(tmp_path)
    monkeypatch.setattr(acceptance, "BUDGETS", {"install": 2, "env": 2, "kernel-tests": 2, "cuda-tests": 2,
                                                "benchmarks": 5})
    cmds = {"install": _stage("print('installed')"),
            "env": _stage("print('{\"gpu\": \"fake\"}')"),
            "kernel-tests": _fake_tests(f"{out}/kernel-tests.jsonl", [("k::a", "passed"), ("k::b", "failed")], code=1),
            "cuda-tests": _fake_tests(f"{out}/cuda-tests.jsonl", [("c::a", "passed"), ("c::s", "skipped")], hang=True),
            "benchmarks": _stage("raise SystemExit(0)")}
    monkeypatch.setattr(acceptance, "installed", lambda python: False)
    assert acceptance.run(out, cmds=cmds) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [summary[s]["status"] for s in acceptance.STAGES] == ["passed", "passed", "failed", "timed out", "passed"]
    assert summary["kernel-tests"]["details"] == "1 passed, 1 failed, 0 skipped (k::b)"
    assert summary["cuda-tests"]["details"] == ("1 passed, 0 failed, 1 skipped; cut short in "
                                                "tests/cuda/test_gpu.py::test_slow")
    cut = summary["cuda-tests"]  # killed at its limit (2 s + what earlier stages left unspent), not after 60 s
    assert 2 <= cut["limit_s"] <= 8 and cut["seconds"] <= cut["limit_s"] + 5
    assert summary["env"]["details"] == '{"gpu": "fake"}'
    text = (tmp_path / "summary.md").read_text()
    assert "| all | |" in text and "| 13 |" in text and "| install | passed |" in text
    for stage in acceptance.STAGES:
        assert (tmp_path / f"{stage}.log").is_file()


def test_an_installed_interpreter_skips_the_install_and_skip_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setattr(acceptance, "installed", lambda python: True)
    cmds = {s: _stage("pass") for s in acceptance.STAGES}
    assert acceptance.run(str(tmp_path), skip=("benchmarks",), cmds=cmds) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["install"]["status"] == "skipped" and "already has" in summary["install"]["details"]
    assert summary["benchmarks"]["status"] == "skipped"


def test_the_results_plugin_writes_each_test_as_it_ends(tmp_path):
    """The real plugin under a real pytest run of a small file: outcomes per test, and the test that was running."""
    test_file = tmp_path / "test_sample.py"
    test_file.write_text("import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert False\n\n"
                         "@pytest.mark.skip(reason='x')\ndef test_skip():\n    pass\n")
    results = tmp_path / "r.jsonl"
    env = {"FASTCLR_TEST_RESULTS": str(results), "PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "benchmarks.pytest_results", "-p",
                    "no:cacheprovider", str(test_file)], capture_output=True, text=True, cwd=tmp_path, env=env)
    c = read(str(results))
    assert (c["passed"], c["failed"], c["skipped"], c["running"]) == (1, 1, 1, None)
    assert c["failed_tests"][0].endswith("test_bad")


def test_command_line_refuses_unknown_stages_and_the_cuda_tests_skip_without_a_gpu(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "benchmarks.gpu_acceptance", "--out", str(tmp_path), "--skip", "x"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "invalid choice: 'x'" in bad.stderr
    cuda = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/cuda", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=ROOT)
    assert cuda.returncode == 0 and "skipped" in cuda.stdout and "failed" not in cuda.stdout
