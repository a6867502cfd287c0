"""The report of a suite run: ``report.md`` beside ``results.jsonl`` and the plots; optionally README's Performance
section, rebuilt from the same rows (between the ``performance:begin``/``end`` markers)."""
from __future__ import annotations

import os
import platform

from .common import ROOT, bar_chart

README_BEGIN = "<!-- performance:begin (written by python -m benchmarks --readme) -->"
README_END = "<!-- performance:end -->"
GPU_COMMAND = ("bash launchers/install.sh --bench && .venv/bin/python -m benchmarks --quick --readme"
               "   # on a CUDA machine: the CUDA build of torch and DALI are picked by nvidia-smi")
HIGHER_IS_BETTER = ("images/s", "TFLOP/s", "GFLOP/s", "efficiency", "% kNN top-1")


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def speedups(rows: list[dict]) -> list[dict]:
    """Per group with a baseline: every other variant's speed-up over it (>1 = better than the baseline)."""
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == group]
        base = [r for r in rs if r["role"] == "baseline"]
        for b in base:
            for r in rs:
                if r["role"] == "baseline":
                    continue
                higher = r["unit"] in HIGHER_IS_BETTER
                if not (r["median"] > 0 and b["median"] > 0):
                    continue  # nothing measurable (e.g. no memory growth at a tiny size)
                q = (r["median"] / b["median"]) if higher else (b["median"] / r["median"])
                out.append({"benchmark": r["benchmark"], "group": group, "variant": r["variant"], "role": r["role"],
                            "baseline": b["variant"], "unit": r["unit"], "value": r["median"],
                            "baseline_value": b["median"], "speedup": q})
    return out


def acceptance(rows: list[dict]) -> list[tuple[str, float | None, str, bool | None]]:
    """(claim, measured figure, bar, met) for the bars the project sets itself."""
    def med(group_part, variant, bench=None):
        for r in rows:
            if group_part in r["group"] and r["variant"] == variant and (bench is None or r["benchmark"] == bench):
                return r["median"]
        return None

    checks = []
    f, b = med("step resnet18 32px b256", "fastclr"), med("step resnet18 32px b256", "plain-pytorch")
    checks.append(("train step ResNet-18 32px b256: fastclr / plain PyTorch images/s", f / b if f and b else None,
                   ">= 1.3", (f / b >= 1.3) if f and b else None))
    c, e = med("compile resnet18 32px", "compiled"), med("compile resnet18 32px", "eager")
    checks.append(("train step ResNet-18 32px: torch.compile / eager images/s", c / e if c and e else None, ">= 1.05",
                   (c / e >= 1.05) if c and e else None))
    ex = [med(f"breakdown {g}", "comm", "breakdown") for g in ("2 ranks overlapped", "2 ranks")]
    if all(ex):
        checks.append(("2-rank exposed gradient communication: overlapped / after backward ms", ex[0] / ex[1], "< 1.0",
                       ex[0] < ex[1]))
    ft, pt = med("tta cifar10", "fastclr"), med("tta cifar10", "plain-pytorch")
    if ft and pt:
        checks.append(("CIFAR-10 kNN top-1 at equal wall time: fastclr − plain PyTorch (points)", ft - pt, "> 0",
                       ft > pt))
        tf, tp = med("time to ", "fastclr", "tta"), med("time to ", "plain-pytorch", "tta")
        checks.append(("time to the baseline's final kNN accuracy: fastclr / plain PyTorch",
                       tf / tp if tf and tp else None, "<= 0.5", (tf / tp <= 0.5) if tf and tp else False))
    mt = med("lars step resnet50", "multi-tensor")
    for loop in ("per-parameter loop", "same-kernel loop"):
        lp = med("lars step resnet50", loop)
        checks.append((f"LARS ResNet-50 step time: {loop} / multi-tensor", lp / mt if mt and lp else None, ">= 1.0",
                       (lp / mt >= 1.0) if mt and lp else None))
    mo = med("lars operator calls resnet50", "multi-tensor")
    for loop in ("per-parameter loop", "same-kernel loop"):
        lo = med("lars operator calls resnet50", loop)
        checks.append((f"LARS ResNet-50 operator calls: multi-tensor / {loop}", mo / lo if mo and lo else None,
                       "<= 0.1", (mo / lo <= 0.1) if mo and lo else None))
    for size in (32, 224):
        d = med(f"data {size}px", "fastclr-dali")
        for base in ("pil-dataloader", "kornia-cpu", "kornia-cuda"):
            v = med(f"data {size}px", base)
            if d and v:
                checks.append((f"data {size}px: DALI / {base} images/s", d / v, ">= 1.0", d / v >= 1.0))
    return checks


def _table(rows: list[dict]) -> list[str]:
    out = ["| group | variant | role | median | p25–p75 | unit | n |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['group']} | {r['variant']} | {r['role']} | {_fmt(r['median'])} | "
                   f"{_fmt(r['p25'])}–{_fmt(r['p75'])} | {r['unit']} | {r['repeats']} |")
    return out


def _machine(rows: list[dict]) -> str:
    import torch

    r = rows[0] if rows else {}
    return (f"{r.get('device_name', '?')}, {r.get('threads', '?')} threads; torch {torch.__version__}, "
            f"Python {platform.python_version()}; commit {r.get('commit', '?')}, {r.get('timestamp', '?')}")


def _notes(rows: list[dict]) -> list[str]:
    notes = []
    bf = [r for r in rows if r["variant"] == "+bf16"]
    for r in bf:
        base = [b for b in rows if b["group"] == r["group"] and b["role"] == "baseline"]
        if base and r["median"] < base[0]["median"]:
            notes.append(f"- bf16 autocast gives no gain in `{r['group']}` on this device: {_fmt(r['median'])} vs "
                         f"{_fmt(base[0]['median'])} {r['unit']} (a CPU without bf16 matrix units emulates it).")
    for r in rows:
        if r["role"] == "ablation":
            base = [b for b in rows if b["group"] == r["group"] and b["role"] == "baseline"]
            if base and r["median"] < 0.97 * base[0]["median"] and r["variant"] != "+bf16":
                notes.append(f"- `{r['variant']}` alone is slower than the baseline in `{r['group']}`: "
                             f"{_fmt(r['median'])} vs {_fmt(base[0]['median'])} {r['unit']}.")
    return notes


def write_report(rows: list[dict], out_dir: str, *, mode: str, state: dict, readme: bool = False) -> dict:
    from . import scaling

    sp = speedups(rows)
    # Smoke sizes check that everything runs; they measure nothing worth a bar.
    checks = acceptance(rows) if mode != "smoke" else []
    lines = [f"# fastclr benchmark report ({mode})", "", f"Measured on: {_machine(rows)}.", "",
             "Every ratio compares rows measured side by side in this run on this machine; medians, with the "
             "p25–p75 spread. Raw rows: `results.jsonl`.", ""]
    if state.get("failures"):
        lines += ["## Failed", ""] + [f"- {k}: {v}" for k, v in state["failures"].items()] + [""]
    lines += ["## Against the baselines", "", "Better by: how many times better than the baseline (higher rate, "
              "or lower time, memory or call count).", "", "| benchmark | comparison | fastclr | baseline | better by |",
              "|---|---|---|---|---|"]
    for s in sp:
        lines.append(f"| {s['benchmark']} | {s['group']}: {s['variant']} vs {s['baseline']} | {_fmt(s['value'])} "
                     f"{s['unit']} | {_fmt(s['baseline_value'])} | **{s['speedup']:.2f}×** |")
    lines += ["", "## Bars", "", "| claim | measured | bar | met |", "|---|---|---|---|"]
    for claim, value, bar, met in checks:
        lines.append(f"| {claim} | {'—' if value is None else f'{value:.2f}'} | {bar} | "
                     f"{'—' if met is None else ('yes' if met else '**no**')} |")
    notes = _notes(rows)
    if notes:
        lines += ["", "## Notes", ""] + notes
    plots = []
    for bench in ("train_step", "data", "ntxent", "lars", "flops"):
        rs = [r for r in rows if r["benchmark"] == bench]
        if not rs:
            continue
        path = os.path.join(out_dir, f"{bench}.png")
        if bench != "flops":
            bar_chart(rs, path, f"{bench}, {rs[0]['device_name']}")
            plots.append(path)
        lines += ["", f"## {bench}", ""] + _table(rs)
        if bench == "train_step":
            roof = [r["median"] for r in rows if r["group"] == "matmul roofline"]
            lines += ["", "Achieved training FLOP/s (counted FLOPs / median step time)"
                      + (f", and its fraction of this device's measured dense bf16 matmul rate ({roof[0]:.0f} TFLOP/s)"
                         if roof else "") + ":", ""]
            lines += [f"- {r['group']} {r['variant']}: {r['achieved_tflops'] * 1e3:.1f} GFLOP/s"
                      + (f" ({r['achieved_tflops'] / roof[0] * 100:.1f}% of the matmul rate)" if roof else "")
                      for r in rs if "achieved_tflops" in r]
        if os.path.exists(path):
            lines += ["", f"![{bench}]({os.path.basename(path)})"]
    bd = [r for r in rows if r["benchmark"] == "breakdown"]
    if bd:
        lines += ["", "## Step breakdown (trainer timers)", "", f"Workload: {bd[0]['shape']}.", ""] + _table(bd)
        if os.path.exists(os.path.join(out_dir, "breakdown.png")):
            lines += ["", "![breakdown](breakdown.png)"]
    sc = [r for r in rows if r["benchmark"] == "scaling"]
    if sc:
        scaling.plot(sc, os.path.join(out_dir, "scaling.png"))
        model = [r for r in sc if r["group"] == "scaling model"]
        lines += ["", "## Scaling model", ""]
        if model:
            m = model[0]
            lines += [f"{m['shape']}; compute per step from this run's measured fastclr ResNet-50 step on "
                      f"{m['compute_from']} ({m['compute_s'] * 1e3:.0f} ms at 64 images). Weak scaling, no overlap of "
                      "the gradient all-reduce with backward.", "", scaling.table_markdown(sc), "",
                      "![scaling](scaling.png)"]
        chk = [r for r in sc if r["group"].startswith("scaling check")]
        if len(chk) == 2:
            meas, pred = chk[0]["median"], chk[1]["median"]
            lines += ["", f"Check against the measured 2-rank CPU run ({chk[0]['shape']}): gradient all-reduce "
                      f"measured {meas:.1f} ms/step, predicted {pred:.1f} ms/step from gloo's fitted "
                      f"α = {chk[1]['alpha_us']:.0f} µs, β = {chk[1]['beta_gbps']:.2f} Gb/s and the local flatten/copy-back "
                      f"rate {chk[1]['copy_gbps']:.1f} Gb/s "
                      f"(predicted/measured {pred / meas:.2f})."]
    secs = state.get("seconds", {})
    lines += ["", "## Run", "", f"Mode {mode}; " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
              + f"; total {state.get('total_s', 0):.0f} s.", "", "Reproduce on a GPU machine:", "", "```",
              GPU_COMMAND, "```", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))

    summary = ["", "summary (fastclr vs baseline, same run):"]
    for s in sp:
        summary.append(f"  {s['group'][:40]:<40} {s['variant'][:22]:>22} vs {s['baseline'][:30]:<30} {s['speedup']:6.2f}x  "
                       f"({_fmt(s['value'])} vs {_fmt(s['baseline_value'])} {s['unit']})")
    for claim, value, bar, met in checks:
        summary.append(f"  bar: {claim}: {'-' if value is None else f'{value:.2f}'} ({bar}) "
                       f"{'-' if met is None else ('met' if met else 'NOT MET')}")
    if state.get("failures"):
        summary.append("  FAILED: " + ", ".join(state["failures"]))
    if readme:
        update_readme(rows, sp, checks, mode)
    return {"path": path, "summary": "\n".join(summary), "plots": plots}


def update_readme(rows, sp, checks, mode: str, readme: str = os.path.join(ROOT, "README.md")) -> None:
    text = open(readme).read()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} lacks the performance markers")
    body = [README_BEGIN, "", f"Measured with `python -m benchmarks --{mode}` on {_machine(rows)}. Ratios are "
            "medians of rows measured side by side in that one run.", "",
            "| comparison | fastclr | baseline | fastclr better by |", "|---|---|---|---|"]
    for s in sp:
        if s["role"] == "fastclr":
            body.append(f"| {s['group']}: {s['variant']} vs {s['baseline']} | {_fmt(s['value'])} {s['unit']} | "
                        f"{_fmt(s['baseline_value'])} | {s['speedup']:.2f}× |")
    abl = [s for s in sp if s["role"] == "ablation"]
    if abl:
        body += ["", "One technique at a time on the plain step (ablation):", "",
                 "| workload | technique | images/s over plain |", "|---|---|---|"]
        body += [f"| {s['group']} | {s['variant']} | {s['speedup']:.2f}× |" for s in abl]
    for overlapped in (False, True):
        bd = {r["variant"]: r["median"] for r in rows if r["benchmark"] == "breakdown" and r["unit"] == "ms/step"
              and r["group"].endswith("overlapped") == overlapped}
        if bd:
            shape = next(r["shape"] for r in rows if r["benchmark"] == "breakdown")
            what = ("the gradient all-reduce overlapped with backward (the default; comm = the part left exposed)"
                    if overlapped else "the all-reduce after backward (comm = the whole all-reduce)")
            body += ["", f"Step breakdown from the trainer's timers ({shape}), {what}, ms per step: "
                     + ", ".join(f"{k} {v:.1f}" for k, v in bd.items()) + "."]
    chk = [r for r in rows if r["group"].startswith("scaling check")]
    if len(chk) == 2:
        body += ["", f"Scaling model check on the same 2 ranks: gradient all-reduce predicted {chk[1]['median']:.1f} ms "
                 f"from gloo's measured latency and bandwidth, measured {chk[0]['median']:.1f} ms (ratio "
                 f"{chk[1]['median'] / chk[0]['median']:.2f}; the model leaves out DeepSpeed's per-call work around the "
                 "collective: bucketing, Python). The cluster table (1–64 nodes × 8 GPUs) is in the report; on a GPU machine it uses that "
                 "GPU's measured step."]
    fl = {r["group"].replace("flops ", ""): r["median"] for r in rows
          if r["benchmark"] == "flops" and r["variant"] == "forward+backward"}
    if fl:
        body += ["", "Counted training FLOPs per view (forward + backward): "
                 + ", ".join(f"{k} {v:.2f} GFLOP" for k, v in fl.items()) + "."]
    unmet = [c for c in checks if c[3] is False]
    if unmet:
        body += ["", "Not met in this run: " + "; ".join(f"{c[0]} = {c[1]:.2f} (bar {c[2]})" for c in unmet) + "."]
    body += ["", "Reproduce on a CUDA machine (the full report with plots lands in `benchmarks/results/<time>/`):", "",
             "```bash", GPU_COMMAND, "```", "",
             "The GPU acceptance run is one command on a machine with one CUDA GPU, 8 minutes including the install "
             "(`--dry-run` prints the stages and their budgets): install (torch 2.13.0 for the driver's CUDA major "
             "version, a CPU torch replaced; DALI; DeepSpeed; no Slurm) → env → kernel tests (the Triton NT-Xent "
             "against fp64 at one size per dtype, on a rank's shard, with the memory queue, and past 2³¹ elements) → "
             "CUDA tests (DALI's GPU pipeline with bad files, screened on the host and reaching the GPU decoder; fp16 "
             "overflow steps skipped; 30 steady steps under `torch.cuda.set_sync_debug_mode(\"error\")`; the "
             "compiled step against eager, loss and gradients, TF32 off) → the kernel and step benchmarks. Each stage "
             "has its own time limit and keeps its results when cut short; one summary table comes last:", "",
             "```bash", "bash benchmarks/gpu_acceptance.sh            # results in benchmarks/results/gpu-acceptance-<time>/",
             "```", "", README_END]
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    with open(readme, "w") as f:
        f.write(text[:start] + "\n".join(body) + text[end:])


def main(argv=None) -> None:
    """``python -m benchmarks.report RESULTS_DIR [--readme]``: rebuild a run's report (and README's section)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results_dir")
    p.add_argument("--readme", action="store_true")
    p.add_argument("--mode", default="quick")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in open(os.path.join(args.results_dir, "results.jsonl"))]
    out = write_report(rows, args.results_dir, mode=args.mode, state={}, readme=args.readme)
    print(out["summary"])
    print(f"report: {out['path']}")


if __name__ == "__main__":
    main()
