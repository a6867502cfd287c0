"""The run report: bad-image lists and lines, the RESULT line, the plots; and the rank-aware console log."""
import io
import json
import logging
import sys

import numpy as np

from fastclr import logs
from fastclr.data.screen import BadSamples
from fastclr.data.sources import ArraySource
from fastclr.bad_images import BadSampleReport
from fastclr.plots import plot_run
from fastclr.summary import result_line


def test_result_line_shows_the_baseline_beside_each_figure():
    line = result_line({"knn_top1": 95.61, "baseline_knn_top1": 90.83, "probe_top1": 98.3, "baseline_probe_top1": 94.4})
    assert line == "RESULT kNN top-1 95.6% (random init 90.8%) | linear probe top-1 98.3% (random init 94.4%)"
    assert result_line({"knn_top1": 50.0}) == "RESULT kNN top-1 50.0%"


def test_bad_sample_report_lists_every_bad_image_and_names_new_ones(tmp_path, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    logs.setup(rank=1)
    bad = BadSamples(ArraySource(np.zeros((10, 2, 2, 3), np.uint8), name="arr"))
    report = BadSampleReport(bad, str(tmp_path), rank=1)
    report()  # nothing bad yet: no file, no line
    assert not (tmp_path / "bad_samples.rank1.tsv").exists() and out.getvalue() == ""
    for i in range(7):
        bad.mark(i, f"reason {i}")
    report()
    lines = (tmp_path / "bad_samples.rank1.tsv").read_text().splitlines()
    assert lines == [f"arr[{i}]\treason {i}" for i in range(7)]
    printed = out.getvalue().splitlines()
    assert printed[0] == "fastclr: rank 1: skipped bad image arr[0]: reason 0"
    assert "7 bad image(s) skipped so far (2 more)" in printed[-1]  # every rank reports its own bad images
    logs.setup(rank=0)


def test_only_rank_zero_logs_information():
    log = logging.getLogger("fastclr.some_module")
    for rank, want in ((0, ["fastclr: hello", "fastclr: careful"]), (3, ["fastclr: careful"])):
        out = io.StringIO()
        old, sys.stdout = sys.stdout, out
        try:
            logs.setup(rank)
            log.info("hello")
            log.warning("careful")
        finally:
            sys.stdout = old
        assert out.getvalue().splitlines() == want, rank
    logs.setup(0)


def test_plots_come_from_the_metrics_file(tmp_path):
    rows = [{"kind": "train", "step": s, "loss": 5.0 - s / 10, "lr": 0.1 * s, "images_per_s": 100.0 + s}
            for s in range(1, 6)]
    rows += [{"kind": "eval", "step": 5, "knn_top1": 40.0, "baseline_knn_top1": 30.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_run(str(tmp_path))
    assert sorted(p.split("/")[-1] for p in written) == ["accuracy.png", "images_per_s.png", "loss.png", "lr.png"]
    for p in written:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
