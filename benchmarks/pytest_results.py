"""A pytest plugin that writes each test's outcome as it finishes: one JSON line per test to $FASTCLR_TEST_RESULTS.

    FASTCLR_TEST_RESULTS=out.jsonl python -m pytest -p benchmarks.pytest_results ...

A junit file is written only when pytest ends; a stage killed at its time limit would leave nothing. These lines
are on disk the moment each test ends, so the acceptance run's summary counts what finished and names the test
that was running when the limit came (the last ``start`` line without an outcome).
"""
from __future__ import annotations

import json
import os
import time


def _write(record: dict) -> None:
    path = os.environ.get("FASTCLR_TEST_RESULTS")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def pytest_runtest_logstart(nodeid, location):
    _write({"test": nodeid, "event": "start", "time": time.time()})


def pytest_runtest_logreport(report):
    # One outcome per test: the call's, or setup's when setup failed or skipped, or teardown's when only it failed.
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or \
            (report.when == "teardown" and report.outcome == "failed"):
        _write({"test": report.nodeid, "event": "outcome", "outcome": report.outcome, "when": report.when,
                "seconds": report.duration,
                "message": str(report.longrepr).splitlines()[-1][:300] if report.longrepr else ""})


def read(path: str) -> dict:
    """{passed, failed, skipped, failed_tests, running}: a test's last outcome counts (a teardown failure after a
    passed call is a failure); ``running`` is the test that started and never ended."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failed_tests": [], "running": None}
    if not os.path.isfile(path):
        return counts
    started, outcome = [], {}
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            if r["event"] == "start":
                started.append(r["test"])
            else:
                outcome[r["test"]] = r["outcome"]
    for test, result in outcome.items():
        counts[result] += 1
        if result == "failed":
            counts["failed_tests"].append(test)
    unfinished = [t for t in started if t not in outcome]
    counts["running"] = unfinished[-1] if unfinished else None
    return counts
