"""Where images come from: indexable lists of samples, read on the host and handed to DALI.

A sample is either encoded image bytes (JPEG, PNG, ...; DALI decodes each one once per use) or an already decoded
HWC uint8 array (in-memory datasets, no decode). Every source carries int64 labels, -1 where unknown: training
ignores them, evaluation needs them. Sources only list and read; ordering, sharding and augmentation live in
:mod:`fastclr.data.loader` and :mod:`fastclr.data.augment`.
"""
from __future__ import annotations

import abc
import os
from collections import defaultdict

import numpy as np

from .index import IMAGE_EXTENSIONS, folder_table, tar_table
from .shards import is_pattern, is_shard_list
from .tables import Strings, Table

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
"""The digits train/test split is fixed (not cfg.seed): evaluation numbers stay comparable across runs."""


class Source(abc.ABC):
    """A fixed list of samples. ``read(indices)`` returns one batch in the order given."""

    encoded: bool
    """True: samples are 1-D uint8 arrays of encoded image bytes; False: (H, W, 3) uint8 pixel arrays."""
    labels: np.ndarray
    """(N,) int64 class indices, -1 where the source has none."""
    classes: tuple[str, ...] = ()
    """Class names by index, where the source knows them."""
    name: str = ""
    """Where the samples come from, for messages."""

    def __len__(self) -> int:
        return len(self.labels)

    def sample_name(self, index: int) -> str:
        """A name that finds sample ``index`` again (a path, a tar member), for reports."""
        return f"{self.name}[{index}]"

    def sample_key(self, index: int):
        """``sample_name`` in a form that does not depend on how the path was spelled (for exclusion lists)."""
        return self.sample_name(index)

    @abc.abstractmethod
    def read(self, indices: np.ndarray):
        """The samples at ``indices``, as a list of numpy arrays (encoded bytes or HWC pixels)."""

    @abc.abstractmethod
    def subset(self, keep: np.ndarray) -> "Source":
        """A source of the samples at ``keep`` (sorted indices), in that order."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} samples)"


class ArraySource(Source):
    """Decoded images held in memory, shape (N, H, W, 3) uint8; fed to DALI without a decode step."""

    encoded = False

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "arrays",
                 classes: tuple[str, ...] = ()):
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{name}: images must be a (N, H, W, 3) uint8 array, got {images.dtype} {images.shape}")
        if labels is None:
            labels = np.full(len(images), -1)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"{name}: labels must have shape ({len(images)},), got {labels.shape}")
        self.images, self.labels, self.name, self.classes = images, labels, name, tuple(classes)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.images[indices]  # (B, H, W, 3): one dense batch, a single copy into DALI

    def subset(self, keep: np.ndarray) -> "ArraySource":
        return ArraySource(self.images[keep], self.labels[keep], self.name, self.classes)


class FolderPaths(Table):
    """The paths of a folder's images as its index holds them: ``root/<class>/<path in the class folder>``, built
    on access (a sequence of str without a Python object per image)."""

    def __init__(self, root: str, classes: tuple[str, ...], cls: np.ndarray, rel: Strings):
        self.root, self.classes, self.cls, self.rel = root, classes, cls, rel

    def __len__(self) -> int:
        return len(self.cls)

    def __getitem__(self, i: int) -> str:
        return os.path.join(self.root, self.classes[int(self.cls[i])], self.rel[i])

    def take(self, keep) -> "FolderPaths":
        keep = np.asarray(keep, np.int64)
        return FolderPaths(self.root, self.classes, np.asarray(self.cls)[keep], self.rel.take(keep))


class FileSource(Source):
    """Image files on disk (folder or file list)."""

    encoded = True

    def __init__(self, paths, labels: np.ndarray, name: str, classes: tuple[str, ...] = ()):
        paths = paths if isinstance(paths, FolderPaths) else list(paths)
        self.paths, self.labels, self.name, self.classes = paths, np.asarray(labels, np.int64), name, classes

    def sample_name(self, index: int) -> str:
        return self.paths[index]

    def sample_key(self, index: int) -> str:
        return os.path.realpath(self.paths[index])

    def subset(self, keep: np.ndarray) -> "FileSource":
        paths = self.paths.take(keep) if isinstance(self.paths, FolderPaths) else [self.paths[i] for i in keep]
        return FileSource(paths, self.labels[keep], self.name, self.classes)

    def read(self, indices: np.ndarray) -> list[np.ndarray]:
        return [_read_file(self.paths[i]) for i in indices]


EMPTY = np.zeros(0, np.uint8)


def _read_file(path: str) -> np.ndarray:
    """The bytes of ``path``; an unreadable file (vanished, no permission) reads as empty and is screened out as a
    bad sample instead of stopping the run."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError:
        return EMPTY


class TarSource(Source):
    """Image members of uncompressed tar files, read in place by byte offset (no extraction)."""

    encoded = True

    def __init__(self, tars: list[str], tar_index: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                 labels: np.ndarray, name: str, classes: tuple[str, ...] = (), members=None):
        self.tars, self.tar_index, self.offsets, self.sizes = tars, tar_index, offsets, sizes
        self.labels, self.name, self.classes = np.asarray(labels, np.int64), name, classes
        self.members = members  # a sequence of member names (index.Strings from the sample index), or None

    def sample_name(self, index: int) -> str:
        member = self.members[index] if self.members is not None else f"#{index}"
        return f"{self.tars[int(self.tar_index[index])]}:{member}"

    def sample_key(self, index: int) -> str:
        """``<shard's real path>:<member>`` (each shard's path resolved once: exclusion lists at scale)."""
        if getattr(self, "_real", None) is None:
            self._real = [os.path.realpath(t) for t in self.tars]
        member = self.members[index] if self.members is not None else f"#{index}"
        return f"{self._real[int(self.tar_index[index])]}:{member}"

    def subset(self, keep: np.ndarray) -> "TarSource":
        members = None
        if self.members is not None:
            members = self.members.take(keep) if isinstance(self.members, Strings) else [self.members[i] for i in keep]
        return TarSource(self.tars, self.tar_index[keep], self.offsets[keep], self.sizes[keep], self.labels[keep],
                         self.name, self.classes, members)

    def read(self, indices: np.ndarray) -> list[np.ndarray]:
        out: list = [None] * len(indices)
        by_tar = defaultdict(list)
        for slot, i in enumerate(indices):
            by_tar[int(self.tar_index[i])].append((slot, int(i)))
        for t, items in by_tar.items():
            # One handle per tar and call: read() may run on a read-ahead thread, so no handle is shared.
            with open(self.tars[t], "rb") as f:
                for slot, i in items:
                    f.seek(self.offsets[i])
                    out[slot] = np.frombuffer(f.read(self.sizes[i]), dtype=np.uint8)
        return out


def tar_member_key(name: str) -> str:
    """``shard.tar:member`` with the shard's path resolved."""
    tar, sep, member = name.partition(".tar:")
    return f"{os.path.realpath(tar + '.tar')}:{member}" if sep else os.path.realpath(name)


def read_exclusions(path: str) -> set[str]:
    """Sample keys named in the first tab-separated column of each line of ``path`` (blank and # lines skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config field 'data.exclude': list '{path}' does not exist")
    keys = set()
    with open(path) as f:
        for line in f:
            name = line.rstrip("\n").split("\t", 1)[0].strip()
            if name and not name.startswith("#"):
                keys.add(tar_member_key(name))
    return keys


def without(source: Source, excluded: set[str]) -> Source:
    """``source`` less the samples whose key is in ``excluded``."""
    keep = np.array([i for i in range(len(source)) if source.sample_key(i) not in excluded], np.int64)
    if len(keep) == len(source):
        return source
    if len(keep) == 0:
        raise ValueError(f"config field 'data.exclude' leaves no sample of {source.name}")
    return source.subset(keep)

# --------------------------------------------------------------------------------------------------------------- #
# digits: scikit-learn's bundled 8x8 handwritten digits (Alpaydin & Kaynak 1998), no download


def render_digits(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, 8, 8) grey levels 0–16 → (N, S, S, 3) uint8: ink 16 → 255 on a black background, bilinear upsampling
    (half-pixel centres, edges clamped), the grey value copied to R, G and B."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(images, np.float32) * (255.0 / 16.0))[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8)[:, 0]  # (N, S, S)
    return np.ascontiguousarray(np.repeat(x.numpy()[..., None], 3, axis=-1))


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 8, 8) grey 0–16, labels (n,)) of a fixed stratified 80/20 split: 1,437 train, 360 test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tr, te = train_test_split(np.arange(len(d.target)), test_size=DIGITS_TEST_FRACTION, stratify=d.target,
                              random_state=DIGITS_SPLIT_SEED)
    idx = np.sort(tr if split == "train" else te)
    return d.images[idx], d.target[idx].astype(np.int64)


def digits_source(split: str, image_size: int) -> ArraySource:
    _check_split(split)
    images, labels = digits_split(split)
    return ArraySource(render_digits(images, image_size), labels, name=f"digits[{split}]",
                       classes=tuple(str(i) for i in range(10)))


# --------------------------------------------------------------------------------------------------------------- #
# folder, file list, tar shards


def folder_classes(root: str) -> tuple[str, ...]:
    """Sorted names of the visible sub-folders of ``root``: class index = position in this list."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder '{root}' does not exist (expected root/<class>/<image files>)")
    return tuple(sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")))


def folder_source(root: str, classes: tuple[str, ...] | None = None) -> FileSource:
    """``root/<class>/**/<image>``; class index = position of the folder name in ``classes`` (default: the sorted
    sub-folders of ``root``; pass the training folder's classes for a held-out folder so indices agree). Listed from
    the folder's cached sample index (:mod:`fastclr.data.index`): sorted class folders, sorted files."""
    found = folder_classes(root)
    classes = tuple(classes) if classes is not None else found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ValueError(f"image folder '{root}' has class folders {extra[:5]} that the training classes lack")
    arrays, meta = folder_table(root, found)
    if not meta["samples"]:
        raise FileNotFoundError(f"image folder '{root}' holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) "
                                "in class sub-folders (expected root/<class>/<image files>)")
    to_class = np.array([classes.index(c) for c in found], np.int64)
    paths = FolderPaths(root, found, arrays["cls"], Strings(arrays["rel_blob"], arrays["rel_ends"]))
    return FileSource(paths, to_class[arrays["cls"]], name=root, classes=classes)


def filelist_source(list_path: str) -> FileSource:
    """A text file of ``path [label]`` lines; relative paths are relative to the list's folder. Blank lines and
    ``#`` comments are skipped. Either every line has an integer label or none has (labels are then -1)."""
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"file list '{list_path}' does not exist (expected lines 'path [label]')")
    base = os.path.dirname(os.path.abspath(list_path))
    paths, labels = [], []
    with open(list_path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            label = -1
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                line, label = parts[0], int(parts[1])
            if paths and (label < 0) != (labels[-1] < 0):
                raise ValueError(f"file list '{list_path}' line {lineno}: some lines have a label and others do "
                                 "not; give every line a non-negative integer label or none")
            paths.append(line if os.path.isabs(line) else os.path.join(base, line))
            labels.append(label)
    if not paths:
        raise FileNotFoundError(f"file list '{list_path}' lists no images")
    # Checking every file would cost a stat per image (minutes on network storage); the first one catches the usual
    # mistake, a wrong base folder. A file missing later fails when read, naming its path.
    if not os.path.isfile(paths[0]):
        raise FileNotFoundError(f"file list '{list_path}': first listed image '{paths[0]}' does not exist "
                                f"(relative paths are taken relative to '{base}')")
    return FileSource(paths, np.array(labels, np.int64), name=list_path)


def tar_source(pattern: str, classes: tuple[str, ...] | None = None) -> TarSource:
    """Image members of uncompressed tars, in tar order, from the set's cached sample index
    (:mod:`fastclr.data.index`). Label: a same-key ``.cls``/``.label`` member if present (webdataset), else the index
    of the member's parent folder among ``classes`` (default: the sorted parent folder names; ``train/<class>/
    <file>.jpg`` layouts), else -1."""
    files, arrays, meta = tar_table(pattern)
    if not meta["samples"]:
        raise FileNotFoundError(f"tar shards '{pattern}' hold no image members "
                                f"({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
    parents = meta["parents"]
    if classes is None:
        classes = tuple(parents) if "" not in parents else ()
    explicit = arrays["explicit"]
    if meta.get("all_explicit"):
        labels = explicit  # memory-mapped as it is: no page resident until a label is read
    else:
        class_index = {c: i for i, c in enumerate(classes)}
        by_parent = np.array([class_index.get(p, -1) for p in parents], np.int64)
        labels = np.where(explicit >= 0, explicit, by_parent[arrays["parent"]])
    return TarSource(files, arrays["shard"], arrays["offset"], arrays["size"], labels, name=pattern,
                     classes=tuple(classes), members=Strings(arrays["name_blob"], arrays["name_ends"]))


# --------------------------------------------------------------------------------------------------------------- #

SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")


def build_source(cfg, split: str, image_size: int = 0) -> Source:
    """The source of ``split``, less the samples listed in ``cfg.exclude``. ``image_size`` (0: ``cfg.image_size``)
    is the side the embedded digits are rendered at; files are decoded at their own size."""
    source = _build_source(cfg, split, image_size or cfg.image_size)
    return without(source, read_exclusions(cfg.exclude)) if cfg.exclude else source


def _build_source(cfg, split: str, image_size: int) -> Source:
    """The source of ``split`` for a :class:`fastclr.config.DataConfig`: 'train' reads ``cfg.path``, 'test' reads
    ``cfg.eval_path`` (digits: the fixed 80/20 split). Fails before any compute, naming the missing path."""
    _check_split(split)
    if cfg.dataset == "digits":
        return digits_source(split, image_size)
    path, field = (cfg.path, "data.path") if split == "train" else (cfg.eval_path, "data.eval_path")
    if not path:
        raise ValueError(f"dataset '{cfg.dataset}' needs {field} for the '{split}' split "
                         "(held-out labelled data of the same kind as data.path)")
    kind = detect_kind(path) if cfg.dataset == "auto" else cfg.dataset
    train_kind = detect_kind(cfg.path) if cfg.dataset == "auto" else cfg.dataset
    if kind == "folder":
        classes = folder_classes(cfg.path) if split == "test" and train_kind == "folder" else None
        return folder_source(path, classes)
    if kind == "filelist":
        return filelist_source(path)
    if kind == "tar":
        classes = None
        if split == "test" and train_kind == "tar":
            classes = tar_source(cfg.path).classes or None
        return tar_source(path, classes)
    raise ValueError(f"unknown dataset kind '{kind}' (data.dataset)")


def detect_kind(path: str) -> str:
    """'tar' (a .tar file, a glob or brace pattern, a folder holding .tar shards, a text list of shards), 'folder'
    (a folder of class sub-folders) or 'filelist' (any other file): what ``data.dataset=auto`` reads ``path`` as."""
    if os.path.isdir(path):
        return "tar" if any(f.lower().endswith(".tar") for f in os.listdir(path)) else "folder"
    if path.lower().endswith(".tar") or is_pattern(path) or is_shard_list(path):
        return "tar"
    return "filelist"
