"""Ahead-of-time compilation of the NT-Xent kernels for GPU targets, on a machine without a GPU.

    python -m kernels.aot [--targets 80 90] [--jobs 2] [--json OUT] [--extra fwd:fp32:256:64,128,4,2 ...]

Triton lowers a kernel to PTX and runs the ptxas inside its wheel to a cubin for any target it knows; nothing needs
a device. For each (kernel, dtype, d, launch configuration, target) this reports what decides whether the launch
can run and run well: the shared memory the compiled kernel asks for (the target's limit per block: 163 KB on
sm_80, 227 KB on sm_90 — above it the launch raises OutOfResources), and the registers and spill bytes from ptxas
(a spill sends registers to local memory, in the inner loop here), read from the cubin with the wheel's cuobjdump:
its stack frame is where spills land, so 0 bytes means none. Every entry of kernels/ntxent.py's CONFIGS is
compiled for bf16, fp16 and fp32 at d = 64, 128, 256 (widths up to the table's limit per dtype); tests/kernels/
test_ntxent_aot.py fails on any entry that does not fit or spills. ``--extra`` adds configurations outside the
table (kernel:dtype:d:BLOCK_M,BLOCK_N,warps,stages) — to see why one was left out.

The kernel module is imported with TRITON_INTERPRET unset (its decorators read it at definition time), in worker
processes of their own; each compile takes 1-4 s on one core.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

# Shared memory a block may use (the opt-in maximum), bytes: A100 163 KB, H100 227 KB (CUDA C Programming Guide,
# "Features and Technical Specifications").
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
WIDTHS = (64, 128, 256)
KERNELS = {"fwd": "_fwd_kernel", "rows": "_bwd_rows_kernel", "cols": "_bwd_cols_kernel"}
_OPERANDS = ("R", "C", "Q")  # the embeddings, in the operand dtype
_FP32_POINTERS = ("LOSS", "LSE", "W", "DR", "DC")


def _kernel_module():
    os.environ.pop("TRITON_INTERPRET", None)
    from . import ntxent
    if ntxent.MIN_BLOCK_D != 64:
        raise RuntimeError("kernels.ntxent was imported in interpreter mode; run the compile in a fresh process")
    return ntxent


def _bits(dtype: str) -> int:
    return 32 if dtype == "fp32" else 16


def jobs(targets=(80, 90), extra=()) -> list[tuple]:
    """(kernel, dtype, d, (BLOCK_M, BLOCK_N, warps, stages), capability, in_table) of every compile to run."""
    ntxent = _kernel_module()
    out = []
    for kernel, by_bits in ntxent.CONFIGS.items():
        for dtype in DTYPES:
            for d in WIDTHS:
                for cfg in by_bits[_bits(dtype)].get(ntxent.block_d(d), []):
                    out += [(kernel, dtype, d, tuple(cfg), cap, True) for cap in targets]
    for spec in extra:
        kernel, dtype, d, cfg = spec.split(":")
        out += [(kernel, dtype, int(d), tuple(int(x) for x in cfg.split(",")), cap, False) for cap in targets]
    return out


def compile_one(kernel: str, dtype: str, d: int, cfg: tuple, cap: int, in_table: bool = True) -> dict:
    """Compile one launch for ``sm_<cap>``; its shared memory, registers, spills and verdict."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ntxent = _kernel_module()
    fn = getattr(ntxent, KERNELS[kernel]).fn  # the JITFunction under the autotuner
    bm, bn, warps, stages = cfg
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, **ntxent.launch_constants(_torch_dtype(dtype), d))
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in _OPERANDS or name in _FP32_POINTERS:
            signature[name] = "*" + (DTYPES[dtype] if name in _OPERANDS else "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned, as at run time
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # rows of d = 64, 128, 256 elements
    t0 = time.perf_counter()
    row = dict(kernel=kernel, dtype=dtype, d=d, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
               target=f"sm_{cap}", in_table=in_table)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            compiled = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", cap, 32),
                                      options=dict(num_warps=warps, num_stages=stages))
    except Exception as e:  # noqa: BLE001 - a compile error is a verdict, reported with the rest
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "ok": False,
                "seconds": time.perf_counter() - t0}
    regs, stack = cubin_usage(compiled.asm["cubin"])
    shared = compiled.metadata.shared
    ok = shared <= SHARED_LIMIT[cap] and stack == 0
    return {**row, "shared_bytes": shared, "shared_limit": SHARED_LIMIT[cap], "registers": regs,
            "stack_bytes": stack, "ok": ok, "seconds": time.perf_counter() - t0}


def cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack frame bytes) of a cubin's kernel, read by the cuobjdump inside Triton's wheel.
    Read from the binary, so a kernel taken from Triton's cache reports the same as a fresh compile. The stack frame
    is where ptxas puts what does not fit in registers (its "spill stores" land there): 0 means no spill."""
    import subprocess
    import tempfile

    from triton.backends.nvidia import compiler as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return int(m.group(1)), int(m.group(2))


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _star(job):
    return compile_one(*job)


def available_targets(wanted=(80, 90)) -> tuple[list[int], dict[int, str]]:
    """(targets this Triton can compile for, {target: why not} for the others)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    ok, missing = [], {}
    for cap in wanted:
        try:
            make_backend(GPUTarget("cuda", cap, 32))
            ok.append(cap)
        except Exception as e:  # noqa: BLE001
            missing[cap] = f"{type(e).__name__}: {e}"
    return ok, missing


def run(targets=(80, 90), workers: int = 2, extra=()) -> list[dict]:
    """Compile every job (the table, and ``extra``) on ``workers`` processes; one row per compile."""
    todo = jobs(targets, extra)
    if workers <= 1:
        return [_star(j) for j in todo]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_star, todo))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--extra", nargs="*", default=[], help="kernel:dtype:d:BLOCK_M,BLOCK_N,warps,stages outside the table")
    p.add_argument("--json", default=None, help="write the rows here (JSON list)")
    a = p.parse_args(argv)
    _kernel_module()
    targets, missing = available_targets(a.targets)
    for cap, why in missing.items():
        print(f"sm_{cap}: this Triton cannot compile for it ({why})", file=sys.stderr)
    rows = run(targets, a.jobs, a.extra)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "missing_targets": {f"sm_{k}": v for k, v in missing.items()}}, f, indent=1)
    print(f"{'kernel':<5} {'dtype':<5} {'d':>4} {'tile':>8} {'w':>2} {'s':>2} {'target':<6} {'shared':>9} {'regs':>4} "
          f"{'stack':>6} verdict")
    for r in rows:
        tile = f"{r['block_m']}x{r['block_n']}"
        if "error" in r:
            verdict, res = r["error"], ""
        else:
            verdict = "ok" if r["ok"] else ("over shared memory" if r["shared_bytes"] > r["shared_limit"] else "spills")
            res = f"{r['shared_bytes'] / 1024:>7.1f}KB {r['registers']:>4} {r['stack_bytes']:>6}"
        extra = "" if r["in_table"] else " (not in the table)"
        print(f"{r['kernel']:<5} {r['dtype']:<5} {r['d']:>4} {tile:>8} {r['num_warps']:>2} {r['num_stages']:>2} "
              f"{r['target']:<6} {res} {verdict}{extra}")
    bad = [r for r in rows if r["in_table"] and not r["ok"]]
    print(f"{len(rows)} compiles, {sum(r['seconds'] for r in rows):.0f} s of compile time; "
          f"{len(bad)} table entries that do not fit or spill")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
