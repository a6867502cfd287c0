"""The sample index of a dataset on disk, built once and memory-mapped by every rank.

A tar set's index is the (shard, offset, size, label) table of its image members; a folder's, the path and label of
each image. Listing them reads every tar header or walks every directory: at 1.28M images, minutes per start and,
as Python objects, kilobytes per sample per rank. So the table is built once (shards in parallel on threads),
stored as flat numpy arrays in one file and memory-mapped: a node's ranks share its pages, resident once read.

Cache file: ``.fastclr-index-<hash of the paths>.bin`` beside the data where that folder is writable, else in
``$FASTCLR_INDEX_DIR`` / ``$XDG_CACHE_HOME/fastclr`` / ``~/.cache/fastclr``. Its header records what it was built
from (each shard's path, size and mtime; each walked directory's mtime) and a SHA-256 of its arrays: stale or
damaged, it is rebuilt with a warning. Written atomically: a killed build leaves the old file or none. ``fastclr
data index PATH`` builds it ahead of a job; in a job rank 0 builds what is missing while the others wait
(:func:`fastclr.data.prepare.prepare`). Sample order is the listing's: tar order, shard by shard; sorted class folders, sorted files.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .shards import shard_paths
from .tables import Strings

FORMAT = 1
MAGIC = b"FASTCLR-INDEX\n"
GZIP_MAGIC = b"\x1f\x8b"
_ALIGN = 64
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pnm", ".ppm", ".pgm")
"""Formats DALI's image decoder reads; other files in a folder or tar are ignored."""
LABEL_EXTENSIONS = (".cls", ".label")
"""webdataset-style label members: a text integer next to the image with the same key."""


# --------------------------------------------------------------------------------------------------------------- #
# Tar headers, read directly: a header is 512 bytes, member data follows, padded to 512


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes of 8 GiB and more)
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict:
    out, i = {}, 0
    while i < len(data):
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1:i + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "replace")
        i += length
    return out


def _sample_key(member_name: str) -> str:
    """webdataset convention: the key is the member path up to the first dot of its file name."""
    head, tail = os.path.split(member_name)
    return os.path.join(head, tail.split(".", 1)[0])


def scan_shard(path: str) -> tuple[list[str], list[int], list[int], list[int]]:
    """(names, data offsets, sizes, explicit labels or -1) of the image members of one uncompressed tar, in tar
    order. Reads the headers (and label members) only; ustar, GNU long names and pax headers."""
    names, offsets, sizes, keys, explicit = [], [], [], [], {}
    fd = os.open(path, os.O_RDONLY)
    try:
        end, pos, long_name, pax = os.fstat(fd).st_size, 0, None, {}
        if end < 512:
            gzip = "; it is gzip-compressed" if os.pread(fd, 2, 0) == GZIP_MAGIC else ""
            raise ValueError(f"tar shard '{path}' cannot be read as an uncompressed tar ({end} bytes{gzip})")
        while pos + 512 <= end:
            block = os.pread(fd, 1024, pos)
            header = block[:512]
            if header[0] == 0 and not header.strip(b"\x00"):
                break  # end-of-archive
            stored = _number(header[148:156])
            if stored != sum(header[:148]) + 256 + sum(header[156:512]):
                gzip = "; it is gzip-compressed" if header[:2] == GZIP_MAGIC else ""
                raise ValueError(f"tar shard '{path}' cannot be read as an uncompressed tar (bad header checksum "
                                 f"at byte {pos}{gzip})")
            kind, size = header[156:157], _number(header[124:136])
            size = int(pax.get("size", size)) if kind not in (b"x", b"g") else size
            data_at = pos + 512
            pos = data_at + (size + 511) // 512 * 512
            if kind in (b"L", b"x"):  # the next member's long name / attributes
                data = block[512:512 + size] if size <= 512 else os.pread(fd, size, data_at)
                if kind == b"L":
                    long_name = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    pax = _pax(data)
                continue
            if kind == b"g":
                continue
            name = long_name or pax.get("path")
            if name is None:
                name = header[:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:263] == b"ustar\x00" and header[345] != 0:
                    name = header[345:500].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            long_name, pax = None, {}
            if kind not in (b"0", b"\x00", b"7"):
                continue  # directories, links, devices
            low = name.lower()
            if data_at + size > end:
                warnings.warn(f"tar shard '{path}' ends inside member '{name}' (a cut-off copy?); its members from "
                              "there on are left out", stacklevel=2)
                break
            if low.endswith(IMAGE_EXTENSIONS):
                names.append(name), offsets.append(data_at), sizes.append(size), keys.append(_sample_key(name))
            elif low.endswith(LABEL_EXTENSIONS):
                data = block[512:512 + size] if size <= 512 else os.pread(fd, size, data_at)
                try:
                    explicit[_sample_key(name)] = int(data.decode().strip())
                except ValueError:
                    raise ValueError(f"tar shard '{path}': label member '{name}' holds {data[:40]!r}, not an "
                                     "integer") from None
    finally:
        os.close(fd)
    return names, offsets, sizes, [explicit.get(k, -1) for k in keys]


def _scan_compact(path: str) -> dict:
    """:func:`scan_shard` as arrays: names as one byte blob and lengths, parents as local ids into a short list."""
    names, offsets, sizes, explicit = scan_shard(path)
    parents = [os.path.basename(os.path.dirname(n)) for n in names]
    local = sorted(set(parents))
    ids = {p: i for i, p in enumerate(local)}
    encoded = [n.encode() for n in names]
    return {"offset": np.array(offsets, np.int64), "size": np.array(sizes, np.int64),
            "explicit": np.array(explicit, np.int64), "parents": local,
            "parent": np.array([ids[p] for p in parents], np.int64),
            "name_blob": np.frombuffer(b"".join(encoded), np.uint8), "name_len": np.array([len(e) for e in encoded],
                                                                                      np.int64)}


# --------------------------------------------------------------------------------------------------------------- #
# The cache file: magic, a JSON header (what it was built from, array layout, digest), the arrays


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("FASTCLR_INDEX_DIR") or os.path.join(base, "fastclr")


def _file_name(kind: str, paths: list[str]) -> str:
    digest = hashlib.sha256("\n".join([kind, *paths]).encode()).hexdigest()[:16]
    return f".fastclr-index-{digest}.bin"


def places(kind: str, paths: list[str], beside: str) -> list[str]:
    """Where the cache may be, in the order looked at: beside the data (unless FASTCLR_INDEX_DIR is set), then the
    cache folder."""
    name = _file_name(kind, paths)
    out = [os.path.join(cache_dir(), name)]
    if not os.environ.get("FASTCLR_INDEX_DIR") and _writable(beside):
        out.insert(0, os.path.join(beside, name))
    return out


def _writable(folder: str) -> bool:
    """A folder we may add a file to: write permission, and (for root, whom permissions do not stop) a write bit
    set at all — a folder made read-only (chmod a-w) is meant to stay as it is."""
    try:
        return os.access(folder, os.W_OK) and bool(os.stat(folder).st_mode & 0o222)
    except OSError:
        return False


def _write(place_list: list[str], source: dict, arrays: dict, meta: dict) -> str:
    from ..atomic import write_bytes

    layout, chunks, at = {}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        layout[name] = [a.dtype.str, list(a.shape), at]
        chunks.append(a.tobytes())
        pad = -len(chunks[-1]) % _ALIGN
        chunks.append(b"\x00" * pad)
        at += len(chunks[-2]) + pad
    payload = b"".join(chunks)
    header = json.dumps({"format": FORMAT, "source": source, "arrays": layout, "meta": meta,
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    head = MAGIC + struct.pack("<Q", len(header)) + header
    head += b"\x00" * (-len(head) % _ALIGN)
    for place in place_list:
        try:
            write_bytes(place, head + payload)
            return place
        except OSError:
            continue  # a read-only data folder: the next place
    raise OSError(f"cannot write the sample index to any of {place_list}")


def _header(f) -> tuple[dict, int]:
    """(JSON header, offset of the arrays) of an open cache file; ValueError if it is not one."""
    if f.read(len(MAGIC)) != MAGIC:
        raise ValueError("not a fastclr index file")
    try:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ValueError("unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"not format {FORMAT}, the one this fastclr reads")
    start = len(MAGIC) + 8 + length
    return header, start + (-start % _ALIGN)


def _read(path: str, source: dict):
    """(arrays memory-mapped, meta) of a valid cache file; None if there is none; raises ValueError for a stale or
    damaged one (the caller rebuilds)."""
    if not os.path.isfile(path):
        return None
    f = open(path, "rb")
    with f:
        header, start = _header(f)
        if header.get("source") != source:
            raise ValueError("the data changed since it was built (sizes, modification times or files)")
        f.seek(start)
        digest = hashlib.sha256()  # read in chunks: the check leaves no page of the index resident
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
        if digest.hexdigest() != header.get("sha256"):
            raise ValueError("its arrays do not match their checksum")
    try:
        arrays = {name: np.memmap(path, dtype=np.dtype(dt), mode="r", offset=start + at, shape=tuple(shape))
                  if int(np.prod(shape)) else np.zeros(shape, np.dtype(dt))
                  for name, (dt, shape, at) in header["arrays"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"bad array layout ({e})") from None
    return arrays, header["meta"]


_LOADED: dict = {}


def _cached(kind: str, paths: list[str], beside: str, source: dict | None, build, rebuild: bool = False):
    """The arrays and meta of the index of ``paths``: from this process's memory, a valid cache file, or built now
    (and written). ``source`` describes the data the index must match; None: only a build can tell (``build`` then
    returns it as a third item). ``build=None``: look only, None if there is no valid index."""
    key = (kind, tuple(paths), json.dumps(source, sort_keys=True))
    if key in _LOADED and not rebuild and source is not None:
        return _LOADED[key]
    where = places(kind, paths, beside)
    found = None
    for place in where if (source is not None and not rebuild) else ():
        try:
            found = _read(place, source)
        except (ValueError, OSError) as e:
            warnings.warn(f"sample index {place}: {e}; rebuilding it", stacklevel=3)
        if found is not None:
            break
    if found is None:
        if build is None:
            return None
        t0 = time.monotonic()
        arrays, meta, *built_from = build()
        source = built_from[0] if built_from else source
        meta["build_seconds"] = round(time.monotonic() - t0, 3)
        place = _write(where, source, arrays, meta)
        found = _read(place, source)
        key = (kind, tuple(paths), json.dumps(source, sort_keys=True))
    _LOADED[key] = found
    return found


def _keyed(path: str, kind: str) -> tuple[list[str], str]:
    """(the real paths an index of ``path`` is keyed by, the folder it lies beside)."""
    if kind == "tar":
        real = [os.path.realpath(f) for f in shard_paths(path)]
        return real, os.path.dirname(real[0])
    return [os.path.realpath(path)], os.path.realpath(path)


def places_of(path: str, kind: str) -> list[str]:
    """Where the index of the data set ``path`` ('tar' or 'folder') may lie, in the order looked at."""
    return places(kind, *_keyed(path, kind))


def cache_file(path: str, kind: str) -> str | None:
    """The index file of the data set ``path`` ('tar' or 'folder'), if one exists."""
    return next((p for p in places_of(path, kind) if os.path.isfile(p)), None)


# --------------------------------------------------------------------------------------------------------------- #
# Tar sets and folders


def _stat(path: str) -> list:
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def tar_table(pattern: str, *, rebuild: bool = False, build: bool = True) -> tuple[list[str], dict, dict] | None:
    """(shard paths, arrays, meta) of the image members of the tar set ``pattern``. Arrays: ``shard`` (int32),
    ``offset``, ``size`` (int64), ``explicit`` (int64, the ``.cls`` label or -1), ``parent`` (int32 index into
    ``meta['parents']``, the member's folder name), ``name_blob``/``name_ends`` (member names, :class:`Strings`).
    ``build=False``: None unless a valid index exists."""
    files = shard_paths(pattern)
    real = [os.path.realpath(f) for f in files]
    source = {"shards": [_stat(f) for f in files]}

    def scan():
        with ThreadPoolExecutor(max_workers=min(16, max(4, 2 * (os.cpu_count() or 1)))) as pool:
            scans = list(pool.map(_scan_compact, files))  # compact per shard: few Python objects alive at once
        parent_names = sorted({p for s in scans for p in s["parents"]})
        parent_id = {p: i for i, p in enumerate(parent_names)}
        cat = {k: np.concatenate([s[k] for s in scans]) if scans else np.zeros(0) for k in
               ("offset", "size", "explicit", "name_blob", "name_len")}
        arrays = {"shard": np.repeat(np.arange(len(files), dtype=np.int32), [len(s["offset"]) for s in scans]),
                  "offset": cat["offset"], "size": cat["size"], "explicit": cat["explicit"],
                  "parent": np.concatenate([np.array([parent_id[p] for p in s["parents"]], np.int32)[s["parent"]]
                                            for s in scans]) if scans else np.zeros(0, np.int32),
                  "name_blob": cat["name_blob"].astype(np.uint8), "name_ends": np.cumsum(cat["name_len"])}
        n = len(arrays["offset"])
        return arrays, {"parents": parent_names, "samples": n,
                        "all_explicit": bool(n) and bool((arrays["explicit"] >= 0).all())}

    found = _cached("tar", real, os.path.dirname(real[0]), source, scan if build else None, rebuild)
    return None if found is None else (files, *found)


def _walk_class(root: str, name: str) -> tuple[list[str], list[list]]:
    """(image paths relative to root/name in listing order, [path, mtime] of every directory walked)."""
    out, dirs, class_dir = [], [], os.path.join(root, name)
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()  # os.walk order is the file system's: sort for a reproducible sample list
        dirs.append([os.path.relpath(dirpath, root), os.stat(dirpath).st_mtime_ns])
        rel = os.path.relpath(dirpath, class_dir)
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                out.append(f if rel == "." else os.path.join(rel, f))
    return out, dirs


def folder_table(root: str, classes: tuple[str, ...], *, rebuild: bool = False,
                 build: bool = True) -> tuple[dict, dict] | None:
    """(arrays, meta) of the images under ``root/<class>/``: ``cls`` (int32 index into ``classes``, the root's
    sorted class folders) and ``rel_blob``/``rel_ends`` (paths relative to the class folder). A cache is valid while
    every directory it walked keeps its modification time (files added or removed change their folder's)."""
    real = os.path.realpath(root)
    source = None
    place = None if rebuild else cache_file(root, "folder")
    if place is not None:
        try:  # re-stat what the cache walked (a stat per directory, not a walk)
            with open(place, "rb") as f:
                recorded = _header(f)[0]["source"]
            if recorded["classes"] == list(classes):
                source = {"classes": recorded["classes"],
                          "dirs": [[d, os.stat(os.path.join(real, d)).st_mtime_ns] for d, _ in recorded["dirs"]]}
        except (OSError, ValueError, KeyError, TypeError):
            source = None  # changed or unreadable: walk again

    def walk():
        with ThreadPoolExecutor(max_workers=min(8, max(2, os.cpu_count() or 1))) as pool:
            walks = list(pool.map(lambda c: _walk_class(real, c), classes))
        # Not the root's own time: the index file written into it changes that. Its class folders are compared by
        # name (``classes``), everything below them by time.
        walked = {"classes": list(classes), "dirs": [d for _, dirs in walks for d in dirs]}
        table = Strings.of(p for paths, _ in walks for p in paths)
        cls = np.repeat(np.arange(len(classes), dtype=np.int32), [len(p) for p, _ in walks])
        return {"cls": cls, "rel_blob": table.blob, "rel_ends": table.ends}, {"samples": len(cls)}, walked

    if source is None and not build:
        return None
    return _cached("folder", [real], real, source, walk if build else None, rebuild)
