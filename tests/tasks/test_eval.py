"""``fastclr eval``: on a backbone.pt (with the config.yaml beside it), on the checkpoint folder and on an export, the
figures the pretraining run printed at its end."""
import subprocess
import sys

from fastclr.summary import result_line
from fastclr.tasks.eval import evaluate_source
from tests.helpers import ROOT, subprocess_env


def test_backbone_checkpoint_and_export_give_the_runs_final_figures(pretrained, tmp_path):
    from fastclr.export import export
    from fastclr.weights import load_weights

    run, final = pretrained
    assert set(final) >= {"knn_top1", "probe_top1", "baseline_knn_top1", "baseline_probe_top1"}
    export(load_weights(str(run / "ckpt")), str(tmp_path / "export"))
    for source in (run / "backbone.pt", run / "ckpt", tmp_path / "export" / "backbone.safetensors"):
        got = evaluate_source(str(source))
        assert {k: got[k] for k in final if k in got} == {k: final[k] for k in got}, source
        assert result_line(got) == result_line({k: final[k] for k in got})


def test_the_command_prints_the_runs_result_line(pretrained):
    run, final = pretrained
    out = subprocess.run([sys.executable, "-m", "fastclr", "eval", str(run / "backbone.pt")], capture_output=True,
                         text=True, cwd=ROOT, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"fastclr: {result_line(final)}" in out.stdout.splitlines()
