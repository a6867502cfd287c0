"""Bad samples: find the encoded images DALI cannot decode before they reach a training pipeline.

A DALI pipeline whose decoder meets an undecodable image fails as a whole, so every encoded sample passes a screen on
the host (the loader's read-ahead thread) first:

1. a cheap structural check of the bytes, microseconds per image: a known signature, and a complete stream where the
   format makes that cheap to see (JPEG: the marker segments up to the scan are well formed and the file ends with
   the end-of-image marker; PNG: IHDR first, IEND last; BMP and WebP: the declared size fits);
2. anything the cheap check cannot vouch for (truncated or damaged-looking files, formats without a cheap check) is
   decoded once by DALI's own CPU decoder, the decoder training uses: what it decodes is good, what it refuses is bad.
   That decode runs in a child process (:mod:`fastclr.data.decoder`): a decoder that crashes on a file makes it bad
   ("decoder crashed (SIGSEGV)") instead of ending the run.

So the verdict is DALI's, and the price of the exact verdict is paid only by unusual files. Decodable oddities need
nothing: the decoder's RGB output turns grayscale, palette, CMYK/YCCK and alpha images into 3-channel RGB, and the
random resized crop scales images smaller than the crop up. What the screen still misses (the GPU decoder disagreeing
with the CPU one, a header valid to every check with a broken body) makes the pipeline fail; the loader then asks
:func:`decodes` about every sample of the failed batch, marks the guilty ones and rebuilds (see ``TrainLoader``).
"""
from __future__ import annotations

import struct

import numpy as np

from . import decoder

JPEG_SOI = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"

# JPEG markers without a length field (TEM, RSTn, SOI, EOI) and the frame (SOF) markers.
_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8, 0xD9}
_SOF = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}
_TRAILER_SLACK = 64
"""Bytes of padding tolerated after a JPEG's end-of-image marker before the file counts as suspicious."""

OK, SUSPECT = "ok", "suspect"


def sniff(buf) -> str:
    """The image format by signature: 'jpeg', 'png', 'bmp', 'webp', 'tiff', 'jp2', 'pnm' or '' (not an image)."""
    head = bytes(buf[:16])
    if head.startswith(JPEG_SOI):
        return "jpeg"
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "jp2"
    if len(head) >= 2 and head[0] == ord("P") and head[1] in b"123456":
        return "pnm"
    return ""


def _jpeg_check(buf) -> str:
    """OK if the marker segments up to the first scan are well formed and the file ends with EOI."""
    n, i, frame = len(buf), 2, False
    while True:
        if i + 4 > n or buf[i] != 0xFF:
            return SUSPECT
        while buf[i + 1] == 0xFF:  # fill bytes before a marker
            i += 1
            if i + 4 > n:
                return SUSPECT
        marker = buf[i + 1]
        if marker in _STANDALONE:
            if marker == 0xD9:
                return SUSPECT  # EOI before any scan
            i += 2
            continue
        length = (buf[i + 2] << 8) | buf[i + 3]
        if length < 2 or i + 2 + length > n:
            return SUSPECT
        frame |= marker in _SOF
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        i += 2 + length
    if not frame:
        return SUSPECT
    tail = bytes(buf[max(0, n - _TRAILER_SLACK - 2):])
    return OK if b"\xff\xd9" in tail else SUSPECT


def _png_check(buf) -> str:
    return OK if bytes(buf[12:16]) == b"IHDR" and bytes(buf[-len(PNG_IEND):]) == PNG_IEND else SUSPECT


def quick_check(buf) -> tuple[str, str]:
    """``(verdict, format)`` from the bytes alone: verdict 'ok' (decodable as far as a cheap check can tell),
    'suspect' (needs a decode to tell) or an error message (certainly bad)."""
    if len(buf) == 0:
        return "empty file", ""
    fmt = sniff(buf)
    if not fmt:
        return "not an image (unknown file signature)", ""
    # A memoryview reads the bytes in place: the screen runs on every sample, so it copies nothing but a few slices.
    data = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
    if fmt == "jpeg":
        return _jpeg_check(data), fmt
    if fmt == "png":
        return _png_check(data), fmt
    if fmt == "bmp" and len(data) >= 6:
        return (OK if struct.unpack("<I", bytes(data[2:6]))[0] <= len(data) else SUSPECT), fmt
    if fmt == "webp":
        return (OK if struct.unpack("<I", bytes(data[4:8]))[0] + 8 <= len(data) else SUSPECT), fmt
    return SUSPECT, fmt


def _as_array(buf) -> np.ndarray:
    return buf if isinstance(buf, np.ndarray) else np.frombuffer(bytes(buf), np.uint8)


def pixels(buf) -> tuple[np.ndarray | None, str | None]:
    """(HWC uint8 RGB pixels, None) from DALI's CPU decoder, or (None, why it cannot decode ``buf``). The decode runs
    in the decoder process (:mod:`fastclr.data.decoder`): a crash there is a verdict, "decoder crashed (...)"."""
    return decoder.decode([_as_array(buf)], pixels=True)[0]


def decodes_on_gpu(buf, device_id: int) -> str | None:
    """The GPU (mixed) decoder's verdict on one encoded image: it can refuse streams the CPU decoder reads."""
    return decoder.decode([_as_array(buf)], device_id=device_id)[0][1]


def as_png(buf) -> np.ndarray:
    """An encoded image the CPU decoder reads, decoded there and re-encoded as lossless PNG: the same pixels, in a
    stream every decoder takes (for images the GPU decoder refuses)."""
    import io

    from PIL import Image

    image, reason = pixels(buf)
    if image is None:
        raise ValueError(f"as_png: {reason}")
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", compress_level=1)
    return np.frombuffer(out.getvalue(), np.uint8)


def decodes(buf) -> str | None:
    """DALI's CPU decoder's verdict on one encoded image: None if it decodes, else why not."""
    if len(buf) == 0:
        return "empty file"
    return decoder.decode([_as_array(buf)])[0][1]


def screen(buf) -> str | None:
    """None if ``buf`` is an image DALI decodes, else the reason it is bad. Cheap for ordinary JPEG/PNG files; one
    CPU decode for anything the cheap check cannot vouch for."""
    verdict, fmt = quick_check(buf)
    if verdict == OK:
        return None
    if verdict != SUSPECT:
        return verdict
    reason = decodes(buf)
    return None if reason is None else f"truncated or corrupt {fmt.upper()}: {reason}"


class BadSamples:
    """The bad samples a loader has met: ``screen`` each encoded sample once, remember the verdicts that failed.

    ``check`` is called from the read-ahead thread and the main thread; plain dict updates keep that safe. Good
    verdicts are not stored: the cheap check repeats in microseconds, and files that needed a decode to vouch for
    them are remembered in ``verified`` so they are decoded once per process, not once per epoch."""

    def __init__(self, source, screen_fn=screen):
        self.source, self.screen_fn = source, screen_fn
        self.bad: dict[int, str] = {}
        self.verified: set[int] = set()
        self._reported = 0

    def check(self, index: int, buf) -> bool:
        """True if the sample is good."""
        if index in self.bad:
            return False
        if self.screen_fn is screen and quick_check(buf)[0] == OK:
            return True
        if index in self.verified:
            return True
        reason = self.screen_fn(buf)
        if reason is None:
            self.verified.add(index)
            return True
        self.bad[index] = reason
        return False

    def mark(self, index: int, reason: str) -> None:
        self.bad.setdefault(index, reason)

    def names(self) -> list[tuple[str, str]]:
        """(name, reason) of every bad sample met so far, in source order."""
        return [(self.source.sample_name(i), self.bad[i]) for i in sorted(self.bad)]

    def new_since_last_call(self) -> list[tuple[str, str]]:
        """(name, reason) of the bad samples met since the previous call (in the order found)."""
        items = list(self.bad.items())
        fresh, self._reported = items[self._reported:], len(items)
        return [(self.source.sample_name(i), r) for i, r in fresh]
