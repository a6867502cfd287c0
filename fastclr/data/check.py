"""``fastclr data check PATH``: scan a dataset for images training cannot use.

The check decodes every image with DALI's CPU decoder (the decoder training uses), in batches on all cores, in a child
process (a decoder crash makes one file bad instead of ending the check), and reports: how many are good, which are
bad and why, and the decodable oddities (grayscale, CMYK, alpha, palette, smaller than the training crop) that
training converts on the fly. It writes the bad samples to ``<name>.bad.tsv`` (usable as ``data.exclude`` for every
kind of dataset) and, for folders and file lists, a clean file list ``<name>.clean.txt`` (usable as
``data.dataset=filelist``). ``--quick`` reads headers only: it finds empty, non-image and truncated files, not damage
inside a complete file.
"""
from __future__ import annotations

import io
import os
import re
import sys
import time
from collections import Counter

import numpy as np

DECODE_BATCH = 64


def _source_for(path: str, kind: str):
    from . import sources

    if kind == "auto":
        kind = sources.detect_kind(path)
    return kind, {"folder": sources.folder_source, "filelist": sources.filelist_source,
                  "tar": sources.tar_source}[kind](path)


def _oddity(buf, image_size: int) -> str | None:
    """What training will convert about a decodable image, from its header (no decode)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(buf.tobytes() if isinstance(buf, np.ndarray) else buf)) as im:
            mode, (w, h) = im.mode, im.size
    except Exception:  # noqa: BLE001 - PIL lacks a format DALI reads (e.g. some JPEG 2000): nothing to report
        return None
    if min(w, h) < image_size:
        return f"smaller than the {image_size}-px crop"
    return {"L": "grayscale", "LA": "grayscale with alpha", "I;16": "16-bit grayscale", "CMYK": "CMYK",
            "RGBA": "RGB with alpha", "P": "palette", "PA": "palette with alpha", "1": "1-bit"}.get(mode)


class _BatchDecoder:
    """DALI CPU decode of a batch of encoded images on ``threads`` threads, in the decoder process
    (:mod:`fastclr.data.decoder`): it decodes one by one where DALI fails a batch, and a file that crashes the
    decoder is bad ("decoder crashed (SIGSEGV)") while the check goes on."""

    def __init__(self, threads: int):
        self.threads = threads

    def __call__(self, bufs: list[np.ndarray]) -> list[str | None]:
        from .decoder import decode

        return [reason for _, reason in decode(bufs, threads=self.threads)]


def check(path: str, *, kind: str = "auto", image_size: int = 224, quick: bool = False, out_dir: str = ".",
          threads: int = 0, progress: bool = True) -> dict:
    """Scan the dataset at ``path``; returns the summary (also printed) and writes the lists."""
    from tqdm import tqdm

    from .screen import OK, decodes, quick_check

    kind, source = _source_for(path, kind)
    if not source.encoded:
        raise ValueError(f"{path}: not an encoded-image dataset")
    threads = threads or os.cpu_count() or 1
    decoder = None if quick else _BatchDecoder(threads)
    bad: dict[int, str] = {}
    odd: Counter = Counter()
    formats: Counter = Counter()
    t0 = time.monotonic()
    bar = tqdm(total=len(source), unit="img", disable=not progress, desc=f"checking {path}", file=sys.stderr)
    for start in range(0, len(source), DECODE_BATCH):
        idx = np.arange(start, min(start + DECODE_BATCH, len(source)))
        bufs = source.read(idx)
        pending = []
        for i, buf in zip(idx, bufs):
            verdict, fmt = quick_check(buf)
            formats[fmt or "not an image"] += 1
            if verdict == OK:
                pending.append((int(i), buf))
            elif fmt and quick:
                reason = decodes(buf)  # a suspect stream: the decoder decides, even in quick mode
                if reason is None:
                    pending.append((int(i), buf))
                else:
                    bad[int(i)] = f"truncated or corrupt {fmt.upper()}: {reason}"
            elif fmt:
                pending.append((int(i), buf))  # the batch decode below decides
            else:
                bad[int(i)] = verdict
        verdicts = decoder([b for _, b in pending]) if (decoder is not None and pending) else [None] * len(pending)
        for (i, buf), reason in zip(pending, verdicts):
            if reason is not None:
                fmt = quick_check(buf)[1]
                bad[i] = f"corrupt {fmt.upper()}: {reason}" if fmt else reason
            else:
                o = _oddity(buf, image_size)
                if o:
                    odd[o] += 1
        bar.update(len(idx))
    bar.close()
    elapsed = time.monotonic() - t0

    # The lists' name: the path up to its first pattern character (train-{000000..001023}.tar -> train)
    name = os.path.basename(os.path.normpath(re.split(r"[*?[{]", path)[0])).rstrip("-_.") or "dataset"
    name = os.path.splitext(name)[0] or "dataset"
    os.makedirs(out_dir, exist_ok=True)
    bad_list = os.path.join(out_dir, f"{name}.bad.tsv")
    with open(bad_list, "w") as f:
        f.write(f"# bad samples of {path} (fastclr data check); use as data.exclude\n")
        f.writelines(f"{source.sample_name(i)}\t{bad[i]}\n" for i in sorted(bad))
    clean_list = None
    if kind in ("folder", "filelist"):
        clean_list = os.path.join(out_dir, f"{name}.clean.txt")
        with open(clean_list, "w") as f:
            for i in range(len(source)):
                if i not in bad:
                    p = os.path.abspath(source.sample_name(i))
                    f.write(f"{p} {source.labels[i]}\n" if source.labels[i] >= 0 else f"{p}\n")

    summary = {"path": path, "kind": kind, "samples": len(source), "good": len(source) - len(bad), "bad": len(bad),
               "bad_reasons": dict(Counter(r.split(":")[0].split(" (")[0] for r in bad.values())),
               "converted": dict(odd), "formats": dict(formats), "mode": "headers" if quick else "full decode",
               "seconds": elapsed, "bad_list": bad_list, "clean_list": clean_list}
    print(f"{path} ({kind}, {summary['mode']}): {len(source)} images, {summary['good']} good, {len(bad)} bad, "
          f"{elapsed:.1f} s ({len(source) / max(elapsed, 1e-9):.0f} images/s)")
    print("  formats: " + ", ".join(f"{k} {v}" for k, v in formats.most_common()))
    for reason, n in Counter(summary["bad_reasons"]).most_common():
        print(f"  bad: {n} × {reason}")
    for i in sorted(bad)[:10]:
        print(f"    {source.sample_name(i)}: {bad[i]}")
    if len(bad) > 10:
        print(f"    ... {len(bad) - 10} more in {bad_list}")
    for what, n in odd.most_common():
        print(f"  converted while training: {n} × {what}")
    print(f"  bad list: {bad_list} (set data.exclude={bad_list} to skip them without screening)")
    if clean_list:
        print(f"  clean file list: {clean_list} (data.dataset=filelist data.path={clean_list})")
    return summary


def add_parser(sub) -> None:
    """``data check`` under the ``fastclr`` command's subparsers."""
    chk = sub.add_parser("check", help="find images training cannot use; write a bad list and a clean list")
    chk.add_argument("path", help="image folder (class sub-folders), file list, tar shard / folder of shards / glob")
    chk.add_argument("--kind", choices=("auto", "folder", "filelist", "tar"), default="auto")
    chk.add_argument("--image-size", type=int, default=224, help="training crop side, to flag smaller images")
    chk.add_argument("--quick", action="store_true", help="headers and stream ends only, no full decode")
    chk.add_argument("--out-dir", default=".", help="where the .bad.tsv and .clean.txt lists go")
    chk.add_argument("--threads", type=int, default=0, help="decode threads (default: all cores)")
    chk.add_argument("--no-progress", action="store_true")


def main(args) -> int:
    try:
        check(args.path, kind=args.kind, image_size=args.image_size, quick=args.quick, out_dir=args.out_dir,
              threads=args.threads, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"fastclr data check: {e}", file=sys.stderr)
        return 2
    return 0
