"""Two-view SimCLR data loading, images/s: fastclr's DALI pipeline against the PIL DataLoader baseline and Kornia.

    PYTHONPATH=. python -m benchmarks.data [--quick] [--threads N]

Variants, all fed the same encoded JPEGs from memory, all with the same number of CPU threads T:

* ``fastclr-dali``: :class:`fastclr.data.TrainLoader` (decode once, two views, every operator in DALI, T threads);
* ``pil-dataloader`` (baseline): PIL + numpy per image in T ``DataLoader`` worker processes
  (:mod:`benchmarks.pil_augment`), what most public SimCLR code does;
* ``kornia-cpu`` (baseline): Kornia's batched, GPU-style augmentation run on the CPU with T torch threads, the images
  decoded by PIL in T ``DataLoader`` workers (Kornia does not decode);

at 32 px (CIFAR-10 JPEGs from ``../shared/data/cifar10-train-10k.tar``; real photos cut to 32×32 when that file is
absent; jitter strength 0.5, no blur, as the CIFAR recipes) and at 224 px (scikit-learn's ``china.jpg`` and
``flower.jpg``, 640×427, repeated; jitter 1.0, blur p 0.5, as the ImageNet recipes). The rate counts source images
(each gives two views) over windows of batches after a warm-up; rows report the median over windows.
On CUDA the DALI variant runs its GPU graph (``mixed`` decode) and Kornia runs on the GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import time

import numpy as np
import torch

from .common import RESULTS, Recorder, bar_chart, bench_threads, ratio

SHARED_CIFAR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                            "cifar10-train-10k.tar")
DESIGN_32 = dict(jitter_strength=0.5, blur_p=0.0)
DESIGN_224 = dict(jitter_strength=1.0, blur_p=0.5)


def cifar_jpegs(n: int) -> tuple[list[bytes], str]:
    """n 32×32 JPEGs: CIFAR-10 from the shared tar, else 32×32 cuts of scikit-learn's photos."""
    import tarfile

    path = os.environ.get("FASTCLR_CIFAR_TAR", SHARED_CIFAR)
    if os.path.isfile(path):
        with tarfile.open(path) as tf:
            members = [m for m in tf.getmembers() if m.isfile()][:n]
            return [tf.extractfile(m).read() for m in members], "cifar10 jpeg"
    from PIL import Image

    photos, _ = photo_jpegs(2)
    imgs = [Image.open(io.BytesIO(p)).convert("RGB") for p in photos]
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        img = imgs[k % 2]
        side = int(rng.integers(64, 400))
        x, y = int(rng.integers(0, img.width - side)), int(rng.integers(0, img.height - side))
        buf = io.BytesIO()
        img.resize((32, 32), Image.BILINEAR, box=(x, y, x + side, y + side)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, "photo cuts 32x32 jpeg"


def photo_jpegs(n: int) -> tuple[list[bytes], str]:
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    files = [open(os.path.join(folder, f), "rb").read() for f in ("china.jpg", "flower.jpg")]
    return [files[k % 2] for k in range(n)], "china/flower 640x427 jpeg"


class _Bytes:
    """An in-memory encoded source for the fastclr loader."""

    def __init__(self, encoded: list[bytes]):
        from fastclr.data.sources import Source

        class BytesSource(Source):
            encoded = True

            def __init__(self, blobs):
                self.blobs = [np.frombuffer(b, np.uint8) for b in blobs]
                self.labels, self.name = np.full(len(blobs), -1, np.int64), "memory"

            def read(self, indices):
                return [self.blobs[i] for i in indices]

            def subset(self, keep):
                return BytesSource([self.blobs[i].tobytes() for i in keep])

        self.source = BytesSource(encoded)


def _forever(make_iter):
    while True:
        yield from make_iter()


def _rates(batches, batch_size: int, *, warmup: int, windows: int, per_window: int, device) -> list[float]:
    """Images/s of ``windows`` consecutive windows of ``per_window`` batches each, after ``warmup`` batches.

    The windows are back to back (one clock, read after each batch), so together they cover one steady stretch of
    the stream; ``warmup`` must exceed the batches a loader holds ready (prefetch queues, worker read-ahead), or the
    first window would measure a full queue draining."""
    from .common import sync

    for _ in range(warmup):
        next(batches)
    sync(device)
    marks = [time.perf_counter()]
    for _ in range(windows):
        for _ in range(per_window):
            next(batches)
        sync(device)
        marks.append(time.perf_counter())
    return [per_window * batch_size / (t1 - t0) for t0, t1 in zip(marks, marks[1:])]


def dali_batches(encoded, aug, size, batch, threads, device):
    from fastclr.config import DataConfig
    from fastclr.data import TrainLoader

    cfg = DataConfig(image_size=size, num_threads=threads, prefetch=2, augment=aug)
    loader = TrainLoader(_Bytes(encoded).source, cfg, batch_size=batch, device=device, channels_last=True)
    return _forever(lambda: iter(loader)), loader


def pil_batches(encoded, aug, size, batch, threads):
    from .pil_augment import pil_loader

    loader = pil_loader(encoded, aug, size, batch_size=batch, workers=threads)
    return _forever(lambda: iter(loader)), loader


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, encoded):
        self.encoded = encoded

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        from PIL import Image

        img = np.asarray(Image.open(io.BytesIO(self.encoded[i])).convert("RGB"))
        return torch.from_numpy(img.transpose(2, 0, 1).copy())


def kornia_batches(encoded, aug, size, batch, threads, device):
    import kornia.augmentation as K

    from fastclr.data.augment import blur_kernel_size

    s = aug.jitter_strength
    ops = [K.RandomResizedCrop((size, size), scale=aug.crop_area, ratio=aug.crop_aspect),
           K.RandomHorizontalFlip(p=aug.flip_p),
           K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=aug.jitter_p),
           K.RandomGrayscale(p=aug.grayscale_p)]
    if aug.blur_p > 0:
        k = blur_kernel_size(size, aug.blur_kernel_frac)
        ops.append(K.RandomGaussianBlur((k, k), aug.blur_sigma, p=aug.blur_p))
    ops.append(K.Normalize(mean=torch.tensor(aug.mean), std=torch.tensor(aug.std)))
    pipeline = K.AugmentationSequential(*ops).to(device)
    loader = torch.utils.data.DataLoader(_Decoded(encoded), batch_size=batch, shuffle=True, num_workers=threads,
                                         drop_last=True, persistent_workers=True, prefetch_factor=2)

    def gen():
        for x in loader:
            x = x.to(device, non_blocking=True).float().div_(255)
            with torch.no_grad():
                yield pipeline(x), pipeline(x)

    return _forever(gen), loader


def run(rec: Recorder, *, quick: bool = False, smoke: bool = False, threads: int | None = None,
        resolutions=(32, 224)) -> list[dict]:
    from fastclr.config import AugmentConfig

    threads = threads or bench_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for size in resolutions:
        if size == 32:
            n, batch = (64, 32) if smoke else (1024, 256) if quick else (4096, 256)
            encoded, what = cifar_jpegs(n)
            aug = AugmentConfig(**DESIGN_32)
        else:
            n, batch = (16, 8) if smoke else (64, 32) if quick else (256, 64)
            encoded, what = photo_jpegs(n)
            aug = AugmentConfig(**DESIGN_224)
        # Warm-up beyond the deepest read-ahead (DataLoader: 2 batches per worker; DALI: its prefetch queue).
        warmup = 2 * threads + 2
        # Windows of a whole multiple of the worker count: T DataLoader workers hand over batches T at a time.
        windows, per_window = (2, threads) if smoke else (5, 2 * threads) if quick else (7, 3 * threads)
        group = f"data {size}px"
        shape = f"{size}px batch {batch}, {what}, {threads} threads"
        makers = [("fastclr-dali", "fastclr", lambda: dali_batches(encoded, aug, size, batch, threads, device)),
                  ("pil-dataloader", "baseline", lambda: pil_batches(encoded, aug, size, batch, threads)),
                  ("kornia-cpu" if device.type == "cpu" else "kornia-cuda", "baseline",
                   lambda: kornia_batches(encoded, aug, size, batch, threads, device))]
        for variant, role, make in makers:
            with torch.inference_mode(False):
                old = torch.get_num_threads()
                torch.set_num_threads(threads if variant.startswith("kornia") else 1)
                try:
                    batches, handle = make()
                    rates = _rates(batches, batch, warmup=warmup, windows=windows, per_window=per_window,
                                   device=device)
                finally:
                    torch.set_num_threads(old)
                    batches = None
                    if hasattr(handle, "close"):
                        handle.close()
                    handle = None
            rows.append(rec.add(benchmark="data", group=group, variant=variant, role=role, shape=shape,
                                dtype="float32", unit="images/s", values=rates,
                                augment={k: v for k, v in dataclasses.asdict(aug).items()
                                         if k in ("jitter_strength", "blur_p", "crop_area")}))
    return rows


def summary_lines(rows: list[dict]) -> list[str]:
    out = []
    for group in dict.fromkeys(r["group"] for r in rows if r["benchmark"] == "data"):
        for base in ("pil-dataloader", "kornia-cpu", "kornia-cuda"):
            q = ratio(rows, group, "fastclr-dali", base)
            if q is not None:
                out.append(f"{group}: DALI / {base} = {q:.2f}x")
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(RESULTS, "data.jsonl"))
    args = p.parse_args(argv)
    rec = Recorder(args.out)
    rows = run(rec, quick=args.quick, threads=args.threads)
    bar_chart(rows, os.path.splitext(args.out)[0] + ".png", f"two-view loading, {rec.base['device_name']}")
    for line in summary_lines(rows):
        print(line)
    return rows


if __name__ == "__main__":
    main()
