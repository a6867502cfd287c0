"""``python -m benchmarks``: every benchmark in one run, side by side with its baseline, then a report.

    PYTHONPATH=. python -m benchmarks                 # full sizes
    PYTHONPATH=. python -m benchmarks --quick         # CI-sized: <= 10 minutes on a 2-core CPU
    PYTHONPATH=. python -m benchmarks --only data train_step
    PYTHONPATH=. python -m benchmarks --quick --readme   # also rewrite README.md's Performance section
    PYTHONPATH=. python -m benchmarks --only tta --recipe cifar10_resnet18_gpu   # one GPU: 10 min to 84.7% kNN?
    PYTHONPATH=. python -m benchmarks --only data_index   # start-up and index memory at 10k / 100k / 1.28M images

Writes ``benchmarks/results/<timestamp>/`` (or ``--out-dir``): ``results.jsonl`` (one row per measurement, schema in
:mod:`benchmarks.common`), ``report.md``, one PNG per benchmark; prints a summary table last. The same command runs
on CUDA (CUDA events, synchronization, the GPU data path, the Triton loss).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

BENCHMARKS = ("flops", "ntxent", "lars", "data", "data_index", "train_step", "breakdown", "scaling", "tta")
LONG = ("tta", "data_index")
"""Minutes each (tta: two trainings of the budget; data_index: ImageNet-sized sets written and started from dozens of
times): part of a full run, of --quick/--smoke only when named by --only."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI sizes (<= 10 min on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="smallest sizes: checks that everything runs, not speed")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run just these")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results/<timestamp>")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's Performance section from the report")
    p.add_argument("--recipe", default=None, help="tta only: cifar10_quick_cpu (fastclr vs plain PyTorch, the default) "
                                                  "or cifar10_resnet18_gpu (one GPU, 10 min, against the published "
                                                  "84.7%% kNN; a 1-minute smoke without a GPU)")
    args = p.parse_args(argv)

    from .common import RESULTS, Recorder
    from .report import write_report

    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    out_dir = args.out_dir or os.path.join(RESULTS, stamp)
    os.makedirs(out_dir, exist_ok=True)
    rec = Recorder(os.path.join(out_dir, "results.jsonl"), run_stamp=stamp)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    chosen = [b for b in BENCHMARKS if (b in args.only if args.only else not (b in LONG and (args.quick or args.smoke)))]
    print(f"fastclr benchmarks ({mode}) on {rec.base['device_name']}, {rec.base['threads']} threads, commit "
          f"{rec.base['commit']} -> {out_dir}", flush=True)
    kw = dict(quick=args.quick, smoke=args.smoke)
    if args.recipe and "tta" not in chosen:
        p.error("--recipe applies to the tta benchmark: add --only tta")
    state: dict = {"failures": {}, "seconds": {}, "recipe": args.recipe}
    t_all = time.monotonic()
    for name in chosen:
        t0 = time.monotonic()
        print(f"[{name}]", flush=True)
        try:
            _run_one(name, rec, kw, state, out_dir)
        except Exception as e:  # noqa: BLE001 - one failing benchmark must not lose the others' results
            traceback.print_exc()
            state["failures"][name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        state["seconds"][name] = time.monotonic() - t0
    state["total_s"] = time.monotonic() - t_all
    report = write_report(rec.rows, out_dir, mode=mode, state=state, readme=args.readme)
    print(report["summary"], flush=True)
    print(f"report: {report['path']}", flush=True)
    return 1 if state["failures"] else 0


def _run_one(name: str, rec, kw: dict, state: dict, out_dir: str) -> None:
    if name == "flops":
        from . import flops

        state["flops"] = flops.run(rec, **kw)
    elif name == "ntxent":
        from . import ntxent

        ntxent.run(rec, out_dir=out_dir, **kw)
    elif name == "lars":
        from . import lars

        lars.run(rec, **kw)
    elif name == "data":
        from . import data

        data.run(rec, **kw)
    elif name == "data_index":
        from . import data_index

        state["data_index"] = data_index.run(rec, **kw)
        data_index.plot(state["data_index"], os.path.join(out_dir, "data_index.png"))
        print("\n".join(data_index.summary(state["data_index"])), flush=True)
    elif name == "train_step":
        from . import train_step

        train_step.run(rec, flops=state.get("flops"), **kw)
    elif name == "breakdown":
        from . import breakdown

        state["breakdown"] = breakdown.run(rec, **kw)
        breakdown.plot(state["breakdown"], os.path.join(out_dir, "breakdown.png"))
    elif name == "tta":
        from . import tta

        state["tta"] = tta.run(rec, out_dir=out_dir, recipe=state["recipe"] or tta.RECIPE, **kw)
        tta.plot(state["tta"], os.path.join(out_dir, "tta.png"))
    elif name == "scaling":
        from . import scaling

        step_s, per_gpu = _measured_r50_step(rec.rows)
        scaling.run(rec, breakdown=state.get("breakdown"), step_s=step_s, per_gpu_batch=per_gpu, **kw)


def _measured_r50_step(rows: list[dict]) -> tuple[float, int]:
    """The scaling model's compute time: fastclr's measured ResNet-50 step on this device, per image, times the
    per-GPU batch (64, the 4096-at-8-nodes recipe). Without a measurement in this run: 0 (communication only)."""
    per_gpu = 64
    r50 = [r for r in rows if r["benchmark"] == "train_step" and r["variant"] == "fastclr" and "resnet50" in r["group"]]
    if not r50:
        return 0.0, per_gpu
    return per_gpu / r50[-1]["median"], per_gpu


if __name__ == "__main__":
    sys.exit(main())
