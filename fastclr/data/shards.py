"""Lists of tar shards as users write them: brace ranges and alternatives (webdataset's convention,
``train-{000000..001023}.tar``, ``{train,extra}-{0..9}.tar``), globs, a folder of shards, or a text file naming one
shard per line (relative to the file's folder). Python's glob knows no braces: a recipe that says
``train-{000000..001023}.tar`` matched nothing before this module.

Order: braces and lists keep the order they are written in (a zero-padded range is ascending), globs and folders are
sorted; a shard named twice is kept once. Every named shard must exist: a range with holes fails naming the missing
ones, and an empty match names the pattern and the folder it looked in.
"""
from __future__ import annotations

import glob
import os
import re

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Every string the braces of ``pattern`` stand for, in written order: ``{a,b}`` alternatives and ``{M..N}``
    integer ranges (zero-padded to the wider endpoint when either is written with a leading zero). Several braces
    expand as a product, leftmost slowest. Text without braces is returned as is."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in r.groups())
        width = max(len(r.group(1)), len(r.group(2))) if padded else 0
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"shard pattern '{pattern}': '{{{body}}}' is neither a range {{M..N}} nor a list {{a,b}}")
    return [x for item in items for x in expand_braces(head + item + tail)]


def is_pattern(path: str) -> bool:
    """Whether ``path`` names shards by a brace or glob pattern rather than one file or folder."""
    return bool(_BRACE.search(path)) or glob.has_magic(path)


def is_shard_list(path: str) -> bool:
    """A text file naming shards: its first entry ends in ``.tar`` (a file list of images names images)."""
    if not os.path.isfile(path) or path.lower().endswith(".tar"):
        return False
    try:
        with open(path, errors="strict") as f:
            for line in f:
                if line.strip() and not line.lstrip().startswith("#"):
                    return line.split()[0].lower().endswith(".tar")
    except (OSError, UnicodeDecodeError):
        return False
    return False


def _listed(path: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for line in f:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                out += shard_paths(entry if os.path.isabs(entry) else os.path.join(base, entry), _from=path)
    return out


def shard_paths(pattern: str, _from: str | None = None) -> list[str]:
    """The tar files ``pattern`` names (see the module docstring); FileNotFoundError naming what is missing."""
    where = f" (listed in '{_from}')" if _from else ""
    if os.path.isdir(pattern):
        files = sorted(glob.glob(os.path.join(pattern, "*.tar")))
        if not files:
            raise FileNotFoundError(f"tar shards: the folder '{pattern}'{where} holds no *.tar file")
        return files
    if is_shard_list(pattern):
        files = _listed(pattern)
        if not files:
            raise FileNotFoundError(f"tar shards: the list '{pattern}' names no shard")
        return _unique(files)
    files, missing = [], []
    for piece in expand_braces(pattern):
        if glob.has_magic(piece):
            files += sorted(glob.glob(piece))
        elif os.path.isfile(piece):
            files.append(piece)
        else:
            missing.append(piece)
    if missing and (files or len(missing) < len(expand_braces(pattern))):
        shown = ", ".join(os.path.basename(m) for m in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"tar shards '{pattern}'{where}: {len(missing)} named shard(s) do not exist in "
                                f"'{os.path.dirname(missing[0]) or '.'}': {shown}")
    if not files:
        folder = os.path.dirname(pattern) or "."
        hint = "" if os.path.isdir(_BRACE.split(folder)[0] or ".") else " (that folder does not exist)"
        raise FileNotFoundError(f"tar shards '{pattern}'{where} match no file in '{folder}'{hint}: give a .tar file, "
                                "a folder of shards, a glob (train-*.tar), a brace range (train-{000000..001023}.tar) "
                                "or a text file listing shards")
    return _unique(files)


def _unique(files: list[str]) -> list[str]:
    return list(dict.fromkeys(files))
