"""NT-Xent forward+backward: time, peak memory and FLOP/s of naive / tiled / triton, beside the machine's torch.mm.

    python -m benchmarks.ntxent                       # 2N ∈ {1k, 4k, 16k, 64k}, d = 128
    python -m benchmarks.ntxent --quick               # 2N ∈ {1k, 4k}
    python -m benchmarks.ntxent --sizes 16384 --impls naive tiled

Each (impl, 2N) case runs in a fresh subprocess, so its peak memory is its own: on CPU the growth of the process's
peak RSS (VmHWM) over the inputs, on CUDA ``torch.cuda.max_memory_allocated`` over the inputs. FLOPs counted per step:
forward 2·(2N)²·d; naive's backward 2 more GEMMs; tiled/triton recompute the logits in backward (tiled: 1 extra
GEMM, triton: 2, one per backward kernel). The reference rate is ``torch.mm`` on the forward's own GEMM,
(2N × d)·(d × 2N), measured in the same case.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.common import commit as _commit
from benchmarks.common import time_calls

GEMMS = {"naive": 3, "tiled": 4, "triton": 5}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ``getrusage``'s ru_maxrss: Linux carries that across exec, so a
    child of a large parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_case(impl: str, two_n: int, d: int, dtype_name: str, repeats: int) -> dict:
    """One measurement, in this process (call it in a fresh one for a clean peak-memory figure)."""
    import torch

    from fastclr.losses import nt_xent

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("FASTCLR_BENCH_THREADS", "2")))
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=device).manual_seed(0)
    n = two_n // 2
    z_a = torch.randn(n, d, generator=g, device=device, dtype=dtype).requires_grad_(True)
    z_b = torch.randn(n, d, generator=g, device=device, dtype=dtype).requires_grad_(True)

    def step():
        nt_xent(z_a, z_b, 0.1, impl=impl).backward()
        z_a.grad = z_b.grad = None

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_bytes()
    times = time_calls(step, repeats=repeats, device=device)  # the warm-up call: allocations, autotuning
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    a = torch.randn(two_n, d, device=device, dtype=dtype)
    mm_times = time_calls(lambda: torch.mm(a, a.t()), repeats=repeats, device=device)
    flop = 2.0 * two_n * two_n * d
    median = statistics.median(times)
    return {"benchmark": "ntxent", "impl": impl, "two_n": two_n, "d": d, "dtype": dtype_name, "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "median_s": median, "min_s": min(times), "max_s": max(times), "repeats": repeats, "times": times,
            "peak_bytes": int(peak), "flops_per_s": GEMMS[impl] * flop / median,
            "mm_flops_per_s": flop / statistics.median(mm_times)}


def _fits(impl: str, two_n: int, device: str) -> bool:
    """Naive keeps about six (2N × 2N) fp32 matrices alive in backward; skip it where they cannot fit."""
    if impl != "naive":
        return True
    need = 6 * 4 * two_n * two_n
    if device == "cuda":
        import torch

        return need < torch.cuda.get_device_properties(0).total_memory
    return need < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8


def run(rec, *, quick: bool = False, smoke: bool = False, out_dir: str | None = None) -> list[dict]:
    """The suite's entry: naive (baseline) against tiled (+ triton on CUDA), time and extra peak memory per 2N."""
    import tempfile

    sizes = ["--sizes", "256", "1024", "--repeats", "2"] if smoke else ["--quick"] if quick else \
        ["--sizes", "1024", "4096", "16384"]
    out = os.path.join(out_dir or tempfile.mkdtemp(), "ntxent.jsonl")
    rows = main([*sizes, "--out", out])
    recorded = []
    for r in rows:
        if "median_s" not in r:
            continue
        role = "baseline" if r["impl"] == "naive" else "fastclr"
        shape = f"2N={r['two_n']} d={r['d']}"
        recorded.append(rec.add(benchmark="ntxent", group=f"ntxent time {shape}", variant=r["impl"], role=role,
                                shape=shape, dtype=r["dtype"], unit="s", values=r["times"],
                                gflops_per_s=r["flops_per_s"] / 1e9, mm_gflops_per_s=r["mm_flops_per_s"] / 1e9))
        recorded.append(rec.add(benchmark="ntxent", group=f"ntxent memory {shape}", variant=r["impl"], role=role,
                                shape=shape, dtype=r["dtype"], unit="MiB", value=r["peak_bytes"] / 2**20))
    return recorded


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    for impl in GEMMS:
        pts = sorted((r["two_n"], r["median_s"], r["peak_bytes"]) for r in rows if r["impl"] == impl and "median_s" in r)
        if pts:
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax_m.plot([p[0] for p in pts], [max(p[2], 1) / 2**20 for p in pts], marker="o", label=impl)
    for ax, label in ((ax_t, "forward+backward median (s)"), (ax_m, "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("2N (anchors)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536], help="2N values")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--impls", nargs="+", default=None, help="default: naive tiled (+ triton on CUDA)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2N ∈ {1k, 4k}, 3 repeats")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ntxent.jsonl"))
    p.add_argument("--case", nargs=5, metavar=("IMPL", "TWO_N", "D", "DTYPE", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:  # child process: one measurement, printed as JSON
        impl, two_n, d, dtype, repeats = args.case
        print(json.dumps(run_case(impl, int(two_n), int(d), dtype, int(repeats))))
        return []

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = args.impls or (["naive", "tiled", "triton"] if device == "cuda" else ["naive", "tiled"])
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    sizes, repeats = ([1024, 4096], 3) if args.quick else (args.sizes, args.repeats)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stamp, commit = time.strftime("%Y-%m-%dT%H:%M:%S"), _commit()
    rows = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for two_n in sizes:
        for impl in impls:
            base = {"benchmark": "ntxent", "impl": impl, "two_n": two_n, "d": args.d, "dtype": dtype,
                    "device": device, "timestamp": stamp, "commit": commit}
            if not _fits(impl, two_n, device):
                row = {**base, "skipped": "the (2N x 2N) matrices do not fit in memory"}
            else:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.ntxent", "--case", impl, str(two_n),
                                       str(args.d), dtype, str(repeats)], capture_output=True, text=True, env=env,
                                      cwd=root)
                if proc.returncode != 0:
                    row = {**base, "skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
                else:
                    row = {**base, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            if "median_s" in row:
                print(f"{impl:>6} 2N={two_n:>6} d={args.d} {dtype}: {row['median_s']:.3f} s, extra peak "
                      f"{row['peak_bytes'] / 2**20:.0f} MiB, {row['flops_per_s'] / 1e9:.1f} GFLOP/s "
                      f"(torch.mm {row['mm_flops_per_s'] / 1e9:.1f})", flush=True)
            else:
                print(f"{impl:>6} 2N={two_n:>6}: skipped — {row['skipped']}", flush=True)
    plot(rows, os.path.splitext(args.out)[0] + ".png")
    by = {(r["impl"], r["two_n"]): r for r in rows if "median_s" in r}
    for two_n in sizes:
        if ("naive", two_n) in by and ("tiled", two_n) in by:
            nv, tl = by[("naive", two_n)], by[("tiled", two_n)]
            print(f"2N={two_n}: tiled/naive time {tl['median_s'] / nv['median_s']:.2f}x, memory "
                  f"{tl['peak_bytes'] / max(nv['peak_bytes'], 1):.3f}x")
    return rows


if __name__ == "__main__":
    main()
