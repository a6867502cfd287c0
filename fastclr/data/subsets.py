"""Labelled subsets for semi-supervised fine-tuning: class-balanced, deterministic from a seed, kept as file lists.

SimCLR v2 (Chen et al. 2020b) fine-tunes on 1% and 10% of ImageNet's labels (12,811 and 128,116 images, ≤ 13 and
≤ 128 per class), the subsets of google-research/simclr's ``imagenet_subsets/`` — one file name per line, e.g.
``n01440764_10026.JPEG``. :func:`balanced_subset` draws the same kind of subset for any dataset (the same number of
images from every class, as far as a class has them), :func:`write_subset` keeps it as such a list, and
:func:`read_subset` reads either kind back against a dataset's sample names.
"""
from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from .sources import Source

SUBSET_STREAM = 0x5B5E7
"""Mixed into the subset seed so the choice is not correlated with other streams drawn from the same seed."""


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(fraction · N / C)`` samples of each of the C classes (at least 1; all of a class
    that has fewer), chosen by a permutation drawn from ``seed``: a pure function of (labels, fraction, seed).
    Samples labelled -1 (unknown) are never chosen."""
    labels = np.asarray(labels)
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must lie in (0, 1], got {fraction}")
    classes = np.unique(labels[labels >= 0])
    if len(classes) == 0:
        raise ValueError("the dataset has no labels to draw a subset from (every sample is labelled -1)")
    if fraction == 1:
        return np.flatnonzero(labels >= 0)
    per_class = max(1, round(fraction * int((labels >= 0).sum()) / len(classes)))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SUBSET_STREAM])))
    chosen = []
    for c in classes:  # in class order: each class's draw depends only on the seed and the classes before it
        members = np.flatnonzero(labels == c)
        chosen.append(members[rng.permutation(len(members))[:per_class]])
    return np.sort(np.concatenate(chosen))


def subset_name(source: Source, index: int) -> str:
    """How a sample is written in a subset list: a tar member's path inside its shard (``train/cat/0001.jpg``),
    a file's path, or the source's own name for in-memory samples (``digits[train][17]``)."""
    name = source.sample_name(index)
    tar, sep, member = name.partition(".tar:")
    return member if sep else name


def write_subset(source: Source, indices: np.ndarray, path: str, header: str = "") -> str:
    """One :func:`subset_name` per line (sorted indices in, source order out), written atomically."""
    from ..atomic import write_text

    lines = "".join(f"# {line}\n" for line in header.splitlines())
    write_text(path, lines + "".join(subset_name(source, int(i)) + "\n" for i in indices))
    return path


def _suffixes(name: str) -> list[str]:
    """Every trailing run of path components of ``name`` (``a/b/c.jpg`` → ``c.jpg``, ``b/c.jpg``, ``a/b/c.jpg``)."""
    parts = name.replace(os.sep, "/").split("/")
    return ["/".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def read_subset(source: Source, path: str) -> np.ndarray:
    """Sorted indices of the samples a list names. A line names the sample whose :func:`subset_name` ends with it at
    a path boundary: a full path, a tar member, or a bare file name (``n01440764_10026.JPEG`` finds
    ``/data/imagenet/train/n01440764/n01440764_10026.JPEG``). Blank and ``#`` lines are skipped. A line that names
    no sample, or more than one, fails naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label subset list '{path}' does not exist")
    with open(path) as f:
        wanted = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not wanted:
        raise ValueError(f"label subset list '{path}' names no sample")
    by_suffix: dict[str, list[int]] = defaultdict(list)
    needed = {name.replace(os.sep, "/").strip("/").rsplit("/", 1)[-1] for _, name in wanted}
    for i in range(len(source)):
        name = subset_name(source, i)
        if name.replace(os.sep, "/").rsplit("/", 1)[-1] in needed:  # index only the candidates: ImageNet has 1.28M
            for suffix in _suffixes(name):
                by_suffix[suffix].append(i)
    chosen, missing = set(), []
    for lineno, name in wanted:
        hits = by_suffix.get(name.replace(os.sep, "/").strip("/"), [])
        if len(hits) > 1:
            raise ValueError(f"label subset list '{path}' line {lineno}: '{name}' names {len(hits)} samples of "
                             f"{source.name} (e.g. {subset_name(source, hits[0])} and {subset_name(source, hits[1])}); "
                             "write more of its path")
        if not hits:
            missing.append(name)
        else:
            chosen.add(hits[0])
    if missing:
        raise ValueError(f"label subset list '{path}': {len(missing)} of its {len(wanted)} names are not samples of "
                         f"{source.name} (first: {missing[:3]}); is it the list of another dataset?")
    return np.array(sorted(chosen), np.int64)
