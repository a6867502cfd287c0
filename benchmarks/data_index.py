"""Start-up at scale: time to the first training batch and the sample index's resident memory per rank, for
ImageNet-sized sets in tar shards and class folders, cold (no index cache: it is built) and warm (memory-mapped).

    PYTHONPATH=. python -m benchmarks --only data_index                # 10k, 100k, 1.28M images (shards), 10k, 100k (folders)
    PYTHONPATH=. python -m benchmarks.data_index --sizes 10000 --ranks 1 2

The sets come from :mod:`benchmarks.synthetic_imagenet` (generated once under ``--data-dir``, default
``~/.cache/fastclr/synthetic``; 1.28M images are ~5.6 GB, a few minutes to write). Each measurement starts every
rank as a fresh process (gloo, as the launcher does) that lists the set the way ``fastclr pretrain`` does
(:func:`fastclr.data.prepare.prepare`: rank 0 builds a missing index while the others wait on a barrier, then every
rank memory-maps it) and builds its training loader and takes one batch. Reported per rank, slowest rank:

* ``start``: seconds from the process's first line to its first batch (imports included);
* ``index``: resident memory added by listing the set and taking the batch (RSS after − RSS before, the RSS of
  pages the process touched, shared file pages included), per sample; and the same after every index page a
  training epoch reads has been read (``index_epoch``: the shard, offset and size of each sample, its label);
* the baseline: the same command on 3 shards of the set (3,750 images), so that the difference is what N costs.

"Cold" deletes the cache first; the image files stay in the OS page cache either way (dropping it needs root and
would measure this machine's disk): cold is the cost of reading every tar header from memory, not from a disk.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHARD_SIZES = (10_000, 100_000, 1_281_167)
FOLDER_SIZES = (10_000, 100_000)
PER_SHARD = 1_252  # ImageNet-1k's 1,281,167 training images in 1,024 shards, as its shards usually are
BASELINE_SHARDS = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(path: str, t_start: float) -> dict:
    """One rank: list ``path`` as pretraining does, take one batch, report times and resident memory."""
    import numpy as np
    import torch

    from fastclr import runtime
    from fastclr.config import DataConfig
    from fastclr.data.prepare import prepare
    from fastclr.data.loader import build_train_loader

    rt = runtime.setup("gloo")
    cfg = DataConfig(dataset="auto", path=path, image_size=64, num_threads=1, prefetch=1)
    cached = any(os.path.isfile(p) for p in _index_places(path))
    rss0, t0 = _rss(), time.monotonic()
    prepare(cfg, rt)
    loader = build_train_loader(cfg, batch_size=32, shard_id=rt.rank, num_shards=rt.world_size,
                                device=torch.device("cpu"))
    t_listed = time.monotonic()
    next(iter(loader))
    rss1, t1 = _rss(), time.monotonic()
    src = loader.source
    touched = [np.asarray(a).sum() for a in (getattr(src, "offsets", None), getattr(src, "sizes", None),
                                             getattr(src, "tar_index", None), src.labels) if a is not None]
    if hasattr(src, "paths"):
        touched += [len(src.paths[i]) for i in range(0, len(src), 97)]  # a path per page or so
    rss2 = _rss()
    out = {"rank": rt.rank, "samples": len(src), "cached": cached, "start_s": time.time() - t_start, "list_s": t_listed - t0,
           "first_batch_s": t1 - t_listed, "rss_first_batch": rss1 - rss0, "rss_epoch": rss2 - rss0,
           "touched": len(touched)}
    loader.close()
    runtime.teardown()
    return out


def measure(path: str, ranks: int, *, cold: bool) -> dict:
    """Start ``ranks`` fresh processes on ``path``; the slowest rank's times, the largest memory."""
    from fastclr.runtime import free_port

    if cold:
        _drop_index(path)
    port, procs = free_port(), []
    for rank in range(ranks):
        env = dict(os.environ, PYTHONPATH=ROOT, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.data_index", "--worker", path,
                                       "--t0", repr(time.time())], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"data_index worker failed ({p.returncode}): {err[-2000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    slow = max(rows, key=lambda r: r["start_s"])
    return {**slow, "cached": rows[0]["cached"],  # rank 0's view: the others may look after it has built the index
            "rss_first_batch": max(r["rss_first_batch"] for r in rows),
            "rss_epoch": max(r["rss_epoch"] for r in rows)}


def _index_places(path: str) -> list[str]:
    """Where the sample index of ``path`` may lie (fastclr.data.index's lookup order)."""
    from fastclr.data import index, sources

    return index.places_of(path, sources.detect_kind(path))


def _drop_index(path: str) -> None:
    for place in _index_places(path):
        if os.path.isfile(place):
            os.unlink(place)


def datasets(data_dir: str, shard_sizes, folder_sizes) -> list[tuple[str, str]]:
    """(kind, path) of each set, generated where missing; first the baseline, 3 shards of the largest shard set."""
    from .synthetic_imagenet import generate

    out = []
    for n in sorted(set(shard_sizes) | set(folder_sizes)):
        d = os.path.join(data_dir, f"n{n}")
        shards = -(-n // PER_SHARD)
        layout = "both" if n in folder_sizes else "shards"
        if not os.path.isfile(os.path.join(d, "done.json")):
            summary = generate(d, n, min(1000, max(10, n // 100)), shards=shards, layout=layout, seed=0)
            with open(os.path.join(d, "done.json"), "w") as f:
                json.dump(summary, f)
        if n in shard_sizes:
            out.append(("tar", os.path.join(d, f"train-{{000000..{shards - 1:06d}}}.tar")))
        if n in folder_sizes:
            out.append(("folder", os.path.join(d, "folder")))
    big = max(shard_sizes)
    out.insert(0, ("tar", os.path.join(data_dir, f"n{big}", f"train-{{000000..{BASELINE_SHARDS - 1:06d}}}.tar")))
    return out


# Read-ahead target. ResNet-50 SimCLR at 224 px: 8.2 GFLOP per view forward, x3 with backward, two views an image:
# 49 GFLOP an image. An H100's dense bf16 peak is 989 TFLOP/s; at 50% of it (more than ResNet-50 training reaches)
# a GPU consumes 10,100 images/s, each read once from its shard (DALI decodes both views from one read).
READ_TARGET = 10_100
IMAGENET_JPEG_SHAPES = ((500, 375), (375, 500), (500, 333), (640, 480))


def read_ahead(rec, data_dir: str, images: int = 3000, repeats: int = 3) -> dict:
    """What one rank's read-ahead thread does per image — the member's bytes read from its shard and screened —
    on ImageNet-sized JPEGs (~120 KB, quality 90 noise textures), in a random order, on one core."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from fastclr.data.screen import BadSamples
    from fastclr.data.sources import tar_source

    path = os.path.join(data_dir, f"imagenet-sized-{images}.tar")
    rng = np.random.default_rng(0)
    if not os.path.isfile(path):
        bases = []
        for k in range(200):
            w, h = IMAGENET_JPEG_SHAPES[k % len(IMAGENET_JPEG_SHAPES)]
            x = np.linspace(0, 1, w)[None, :, None] * rng.integers(60, 200, 3) + rng.normal(0, 28, (h, w, 3))
            out = io.BytesIO()
            Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
            bases.append(out.getvalue())
        os.makedirs(data_dir, exist_ok=True)
        with tarfile.open(path + ".tmp", "w") as tf:
            for i in range(images):
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(bases[i % len(bases)])
                tf.addfile(info, io.BytesIO(bases[i % len(bases)]))
        os.replace(path + ".tmp", path)
    src = tar_source(path)
    rates = []
    for _ in range(repeats):
        bad, order, t0 = BadSamples(src), rng.permutation(len(src)), time.perf_counter()
        for s in range(0, len(order), 256):
            idx = order[s:s + 256]
            for i, buf in zip(idx, src.read(idx)):
                bad.check(int(i), buf)
        rates.append(len(order) / (time.perf_counter() - t0))
    mean_kb = float(np.asarray(src.sizes).mean()) / 1024
    rec.add(benchmark="data_index", group="read-ahead (bytes + screen), 1 core", variant=f"{mean_kb:.0f} KB JPEGs",
            role="measure", shape=f"{len(src)} images, random order", dtype="-", unit="images/s", values=rates,
            target=READ_TARGET)
    rates.sort()
    return {"images_per_s": rates[len(rates) // 2], "mean_kb": mean_kb, "target": READ_TARGET}


def run(rec, *, quick: bool = False, smoke: bool = False, data_dir: str | None = None, ranks=(1, 2),
        shard_sizes=None, folder_sizes=None) -> dict:
    data_dir = data_dir or os.path.join(os.path.expanduser("~"), ".cache", "fastclr", "synthetic")
    shard_sizes = shard_sizes or ((4_000,) if smoke else (10_000, 100_000) if quick else SHARD_SIZES)
    folder_sizes = folder_sizes or ((4_000,) if smoke else (10_000,) if quick else FOLDER_SIZES)
    starts = []
    for j, (kind, path) in enumerate(datasets(data_dir, shard_sizes, folder_sizes)):
        for k in ranks:
            for cold in (True, False):
                m = measure(path, k, cold=cold)
                starts.append({"kind": kind, "ranks": k, "cold": cold, "path": path, "baseline": j == 0, **m})
    for r in starts:  # against the 3-shard baseline of the same ranks and temperature: what N adds
        base = next(b for b in starts if b["baseline"] and (b["ranks"], b["cold"]) == (r["ranks"], r["cold"]))
        extra = max(r["samples"] - base["samples"], 1)
        r["extra_start_s"] = r["start_s"] - base["start_s"]
        r["bytes_per_sample"] = (r["rss_epoch"] - base["rss_epoch"]) / extra if r is not base else 0.0
        temp = "cold" if r["cold"] else "warm"
        rec.add(benchmark="data_index", group=f"start to first batch, {r['kind']}, {temp}",
                variant=f"N={r['samples']} x{r['ranks']}", role="measure", shape=f"{r['kind']} N={r['samples']}",
                dtype="-", unit="s", value=r["start_s"], ranks=r["ranks"], samples=r["samples"],
                list_s=r["list_s"], extra_start_s=r["extra_start_s"], rss_first_batch=r["rss_first_batch"],
                rss_epoch=r["rss_epoch"], bytes_per_sample=r["bytes_per_sample"])
    return {"read_ahead": read_ahead(rec, data_dir, images=400 if smoke else 3000), "starts": starts}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = result["starts"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind in ("tar", "folder"):
        for k in sorted({r["ranks"] for r in results}):
            for cold in (True, False):
                rs = sorted((r for r in results if (r["kind"], r["ranks"], r["cold"]) == (kind, k, cold)),
                            key=lambda r: r["samples"])
                if not rs:
                    continue
                label = f"{kind}, {k} rank{'s' * (k > 1)}, {'cold' if cold else 'warm'}"
                ax_t.plot([r["samples"] for r in rs], [r["start_s"] for r in rs], "-" if cold else "--", marker="o",
                          label=label)
                if not cold:
                    ax_m.plot([r["samples"] for r in rs], [r["rss_epoch"] / 2 ** 20 for r in rs], marker="o",
                              label=label)
    for ax, what in ((ax_t, "seconds to the first batch"), (ax_m, "resident MiB per rank (index pages read)")):
        ax.set_xlabel("images (linear axis: the growth in N reads as a line)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> list[str]:
    ra = result["read_ahead"]
    lines = [f"read-ahead, one core: {ra['images_per_s']:,.0f} images/s of {ra['mean_kb']:.0f}-KB JPEGs (an H100 "
             f"at 50% of its bf16 peak takes {ra['target']:,}/s for ResNet-50 SimCLR)"]
    for r in result["starts"]:
        lines.append(f"{r['kind']:>6} N={r['samples']:>9,} ranks={r['ranks']} {'cold' if r['cold'] else 'warm'}: "
                     f"{r['start_s']:5.1f} s to the first batch ({r['extra_start_s']:+5.1f} s vs 3 shards; listing "
                     f"{r['list_s']:.1f} s), {r['rss_epoch'] / 2 ** 20:6.1f} MiB resident after an epoch's index "
                     f"reads ({r['bytes_per_sample']:.1f} B/sample over 3 shards)")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="shard-set sizes (default 10k 100k 1.28M)")
    p.add_argument("--folder-sizes", type=int, nargs="+", default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.t0)), flush=True)
        return
    from .common import RESULTS, Recorder

    out_dir = args.out_dir or os.path.join(RESULTS, "data_index-" + time.strftime("%Y-%m-%dT%H-%M-%S"))
    rec = Recorder(os.path.join(out_dir, "results.jsonl"), quiet=True)
    result = run(rec, data_dir=args.data_dir, ranks=tuple(args.ranks), shard_sizes=args.sizes,
                 folder_sizes=args.folder_sizes)
    plot(result, os.path.join(out_dir, "data_index.png"))
    print("\n".join(summary(result)))
    print(f"rows: {out_dir}/results.jsonl, plot: {out_dir}/data_index.png")


if __name__ == "__main__":
    main()
