"""The NT-Xent kernels compiled ahead of time for sm_80 and sm_90, without a GPU (kernels/aot.py).

Every launch configuration the autotuner may pick (kernels/ntxent.py CONFIGS) × bf16/fp16/fp32 × d ∈ {64, 128, 256}
must fit the target's shared memory and keep every value in registers (no stack frame, i.e. no spill), and every
(kernel, dtype, BLOCK_D) the library launches must have at least one such configuration. The compiles run in a
child process: this test session may already hold the kernel module in interpreter mode. ~50 s on 2 cores with an
empty Triton cache, seconds with a warm one (~/.triton/cache, keyed by the kernel source).
"""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env


def _aot(tmp_path, *args) -> dict:
    out = tmp_path / "aot.json"
    env = subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--jobs", str(min(2, os.cpu_count() or 1)),
                           "--json", str(out), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=900)
    if not out.exists():
        raise AssertionError(f"kernels.aot wrote nothing (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["returncode"], result["stdout"] = proc.returncode, proc.stdout
    return result


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    result = _aot(tmp_path_factory.mktemp("aot"))
    if len(result["missing_targets"]) == 2:
        pytest.skip(f"this Triton compiles for neither sm_80 nor sm_90: {result['missing_targets']}")
    return result


def test_every_table_entry_fits_its_target_without_spilling(table):
    bad = [r for r in table["rows"] if not r["ok"]]
    assert not bad, "table entries that do not fit or spill:\n" + "\n".join(map(str, bad))
    assert table["returncode"] == 0, table["stdout"][-2000:]
    for r in table["rows"]:
        limit = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}[r["target"]]
        assert 0 < r["shared_bytes"] <= limit and r["stack_bytes"] == 0 and 0 < r["registers"] <= 255


def test_every_launch_the_library_makes_has_a_clean_config(table):
    """(kernel, dtype, d, target) for every dtype and every d up to that dtype's limit: at least one clean entry; and
    the limits themselves are what the loss front end routes by (fp32 to 128, bf16/fp16 to 256)."""
    clean = {(r["kernel"], r["dtype"], r["d"], r["target"]) for r in table["rows"] if r["ok"]}
    targets = {r["target"] for r in table["rows"]}
    limits = {"bf16": 256, "fp16": 256, "fp32": 128}
    for kernel in ("fwd", "rows", "cols"):
        for dtype, widest in limits.items():
            for d in (64, 128, 256):
                for target in targets:
                    if d <= widest:
                        assert (kernel, dtype, d, target) in clean, (kernel, dtype, d, target)
    env = subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    probe = ("import torch; from kernels import ntxent as k; "
             "print(k.MAX_D[k.operand_bits(torch.bfloat16)], k.MAX_D[k.operand_bits(torch.float16)], "
             "k.MAX_D[k.operand_bits(torch.float32)])")
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert got.stdout.split() == ["256", "256", "128"]


def test_a_configuration_over_shared_memory_is_caught(tmp_path):
    """The check itself: a column-gradient tile of 128 anchors x 256 columns at d = 256 needs ~198 KB, over sm_80's
    163 KB; added to the run (as it would be if it were put back in the table) it is reported and the run fails."""
    result = _aot(tmp_path, "--targets", "80", "--extra", "cols:bf16:256:128,256,8,3")
    extra = [r for r in result["rows"] if not r["in_table"]]
    assert len(extra) == 1 and not extra[0]["ok"] and extra[0]["shared_bytes"] > 163 * 1024, extra
    assert "over shared memory (not in the table)" in result["stdout"]
    assert result["returncode"] == 0  # out-of-table rows are reported, not counted against the table


def test_the_autotuner_offers_only_the_table_entries_of_a_launch():
    """The run-time side: ``prune_configs_by`` keeps exactly CONFIGS[kernel][bits][BLOCK_D] (compiled for real
    targets, so run in a child where the module is not in interpreter mode)."""
    env = subprocess_env()
    env.pop("TRITON_INTERPRET", None)
    probe = """
import torch
from kernels import ntxent as k
for kernel, fn in (("fwd", k._fwd_kernel), ("rows", k._bwd_rows_kernel), ("cols", k._bwd_cols_kernel)):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (3, 64, 96, 128, 200, 256):
            bits = k.operand_bits(dtype)
            if d > k.MAX_D[bits]:
                continue
            r = torch.empty(0, dtype=dtype)
            kept = fn.early_config_prune(fn.configs, {"R": r}, BLOCK_D=k.block_d(d))
            got = sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept)
            assert got == sorted(k.CONFIGS[kernel][bits][k.block_d(d)]), (kernel, dtype, d, got)
print("ok")
"""
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env)
    assert got.returncode == 0 and got.stdout.strip() == "ok", got.stderr[-2000:]
