import io
from collections import Counter
import os
import tarfile

import numpy as np
import pytest

from fastclr.config import DataConfig
from fastclr.data.sources import (ArraySource, build_source, digits_source, digits_split, filelist_source,
                                  folder_source, render_digits, tar_source)
from tests.data.conftest import CIFAR_CLASSES


# --------------------------------------------------------------------------------------------------------------- #
# digits


def test_digits_split_is_fixed_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    d = load_digits()
    tr_x, tr_y = digits_split("train")
    te_x, te_y = digits_split("test")
    assert (len(tr_y), len(te_y)) == (1437, 360)
    # A partition: the multiset of (image, label) pairs of both splits is exactly the raw data's.
    pairs = lambda x, y: Counter(a.tobytes() + bytes([int(b)]) for a, b in zip(x, y))  # noqa: E731
    assert pairs(tr_x, tr_y) + pairs(te_x, te_y) == pairs(d.images, d.target)
    per_class = np.bincount(d.target, minlength=10)
    assert np.all(np.abs(np.bincount(te_y, minlength=10) - 0.2 * per_class) <= 1)  # stratified
    np.testing.assert_array_equal(digits_split("test")[1], te_y)  # fixed: no seed enters
    a = build_source(DataConfig(seed=0), "test")
    b = build_source(DataConfig(seed=123), "test")
    np.testing.assert_array_equal(a.images, b.images)


@pytest.mark.parametrize("size", [8, 32, 45])
def test_digits_render_rgb_bilinear(size):
    src = digits_source("train", size)
    assert src.images.shape == (1437, size, size, 3) and src.images.dtype == np.uint8 and not src.encoded
    assert src.labels.dtype == np.int64 and set(src.labels.tolist()) == set(range(10))
    assert np.array_equal(src.images[..., 0], src.images[..., 1]) and np.array_equal(src.images[..., 1],
                                                                                  src.images[..., 2])
    x8, _ = digits_split("train")
    if size == 8:  # no resampling at the native size: exactly 16 → 255
        np.testing.assert_array_equal(src.images[..., 0], np.round(x8 * 255 / 16).astype(np.uint8))
    # Brightness is preserved on average and the rendered image looks like its 8×8 source.
    assert abs(src.images.mean() - (x8 * 255 / 16).mean()) < 3
    small = render_digits(x8[:50], size).astype(np.float64)[..., 0]
    cell = size / 8
    centres = small[:, (np.arange(8) * cell + cell / 2).astype(int)][:, :, (np.arange(8) * cell + cell / 2).astype(int)]
    assert np.corrcoef(centres.ravel(), x8[:50].ravel())[0, 1] > 0.9


def test_array_source_validates_and_reads_dense_batches():
    imgs = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    src = ArraySource(imgs)
    assert len(src) == 5 and np.all(src.labels == -1)
    np.testing.assert_array_equal(src.read(np.array([3, 0])), imgs[[3, 0]])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        ArraySource(imgs.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) uint8"):
        ArraySource(imgs[..., :1])
    with pytest.raises(ValueError, match="labels"):
        ArraySource(imgs, labels=np.zeros(4))


# --------------------------------------------------------------------------------------------------------------- #
# folder and file list


def test_folder_source_lists_classes_and_reads_bytes(cifar_train_dir, tmp_path):
    src = folder_source(cifar_train_dir)
    assert src.classes == CIFAR_CLASSES and len(src) == 300 and src.encoded
    assert np.array_equal(np.bincount(src.labels), np.full(10, 30))
    for i in (0, 137, 299):
        assert os.path.basename(os.path.dirname(src.paths[i])) == CIFAR_CLASSES[src.labels[i]]
        with open(src.paths[i], "rb") as f:
            assert src.read(np.array([i]))[0].tobytes() == f.read()
    assert src.paths == sorted(src.paths)  # deterministic listing (class order = sorted names)


def test_folder_source_nested_hidden_non_images_and_heldout_classes(tmp_path):
    for rel in ["b/x.JPG", "b/sub/y.png", "b/.hidden.jpg", "b/notes.txt", "a/z.jpeg", ".git/w.jpg"]:
        os.makedirs(os.path.dirname(tmp_path / "train" / rel), exist_ok=True)
        (tmp_path / "train" / rel).write_bytes(b"\xff\xd8")
    src = folder_source(str(tmp_path / "train"))
    assert src.classes == ("a", "b")
    assert [os.path.relpath(p, tmp_path / "train") for p in src.paths] == ["a/z.jpeg", "b/x.JPG", "b/sub/y.png"]
    assert src.labels.tolist() == [0, 1, 1]
    os.makedirs(tmp_path / "test" / "b")
    (tmp_path / "test" / "b" / "q.jpg").write_bytes(b"\xff\xd8")
    held = folder_source(str(tmp_path / "test"), classes=src.classes)  # class 'a' absent: 'b' keeps index 1
    assert held.labels.tolist() == [1]
    os.makedirs(tmp_path / "test" / "c")
    with pytest.raises(ValueError, match=r"\['c'\]"):
        folder_source(str(tmp_path / "test"), classes=src.classes)


def test_folder_source_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        folder_source(missing)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=str(empty)):
        folder_source(str(empty))


def test_filelist_relative_paths_labels_and_errors(cifar_train_dir, tmp_path):
    files = sorted(os.listdir(os.path.join(cifar_train_dir, "cat")))[:3]
    lst = os.path.join(cifar_train_dir, "list.txt")
    with open(lst, "w") as f:
        f.write("# comment\n\n")
        for i, name in enumerate(files):
            f.write(f"cat/{name} {i + 3}\n")
    src = filelist_source(lst)
    assert src.labels.tolist() == [3, 4, 5]
    assert src.paths[0] == os.path.join(cifar_train_dir, "cat", files[0])
    with open(src.paths[1], "rb") as f:
        assert src.read(np.array([1]))[0].tobytes() == f.read()

    unlabelled = tmp_path / "u.txt"
    unlabelled.write_text("".join(f"{os.path.join(cifar_train_dir, 'cat', n)}\n" for n in files))
    assert filelist_source(str(unlabelled)).labels.tolist() == [-1, -1, -1]

    mixed = tmp_path / "m.txt"
    cat = os.path.join(cifar_train_dir, "cat")
    mixed.write_text(f"{os.path.join(cat, files[0])} 1\n{os.path.join(cat, files[1])}\n")
    with pytest.raises(ValueError, match="line 2"):
        filelist_source(str(mixed))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        filelist_source(str(tmp_path / "missing.txt"))
    wrong_base = tmp_path / "w.txt"
    wrong_base.write_text(f"cat/{files[0]} 0\n")
    with pytest.raises(FileNotFoundError, match="relative paths"):
        filelist_source(str(wrong_base))
    blank = tmp_path / "b.txt"
    blank.write_text("# nothing\n")
    with pytest.raises(FileNotFoundError, match="lists no images"):
        filelist_source(str(blank))


# --------------------------------------------------------------------------------------------------------------- #
# tar shards


def test_tar_source_reads_shared_cifar_tar_in_place(shared_data):
    path = os.path.join(shared_data, "cifar10-test-2k.tar")
    src = tar_source(path)
    assert len(src) == 2000 and src.classes == CIFAR_CLASSES
    assert np.array_equal(np.bincount(src.labels), np.full(10, 200))
    pick = np.array([1999, 0, 777, 778])
    got = src.read(pick)
    with tarfile.open(path) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        for k, i in enumerate(pick):
            assert got[k].tobytes() == tf.extractfile(members[i]).read()
            assert members[i].name.split("/")[1] == CIFAR_CLASSES[src.labels[i]]


def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_tar_source_webdataset_shards_glob_and_errors(tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"train-{shard}.tar", "w") as tf:
            for k in range(3):
                key = f"s{shard}_{k}"
                _add(tf, f"{key}.jpg", bytes([shard, k]) * 10)
                _add(tf, f"{key}.cls", str(10 * shard + k).encode())
    src = tar_source(str(tmp_path / "train-*.tar"))
    assert len(src) == 6 and src.labels.tolist() == [0, 1, 2, 10, 11, 12]
    assert [a.tobytes() for a in src.read(np.array([4, 0]))] == [bytes([1, 1]) * 10, bytes([0, 0]) * 10]
    assert len(tar_source(str(tmp_path))) == 6  # a folder of shards
    with pytest.raises(FileNotFoundError, match="nothing-"):
        tar_source(str(tmp_path / "nothing-*.tar"))
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tf:
        _add(tf, "a.jpg", b"12")
    with pytest.raises(ValueError, match="uncompressed"):
        tar_source(str(tmp_path / "gz.tar"))


def test_build_source_splits_and_missing_eval_path(cifar_train_dir, cifar_test_dir):
    cfg = DataConfig(dataset="folder", path=cifar_train_dir, eval_path=cifar_test_dir)
    assert len(build_source(cfg, "train")) == 300 and len(build_source(cfg, "test")) == 100
    with pytest.raises(ValueError, match="data.eval_path"):
        build_source(DataConfig(dataset="folder", path=cifar_train_dir), "test")
    with pytest.raises(ValueError, match="split"):
        build_source(cfg, "val")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        build_source(DataConfig(dataset="folder", path=cifar_train_dir + "/no-such-dir"), "train")



def test_auto_reads_each_path_as_what_it_is(tmp_path, cifar_train_dir, cifar_test_dir):
    """data.dataset=auto: a tar, a folder of class folders, a file list — the CIFAR quick recipe's paths work as
    tar members and as extracted folders alike."""
    from fastclr.data.sources import detect_kind

    tar = tmp_path / "train.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(cifar_train_dir, arcname="train")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p} 0\n" for p in sorted(__import__("glob").glob(f"{cifar_test_dir}/*/*.jpg"))))
    assert detect_kind(str(tar)) == "tar" and detect_kind(str(tmp_path / "*.tar")) == "tar"
    assert detect_kind(cifar_train_dir) == "folder" and detect_kind(str(listing)) == "filelist"
    as_tar = build_source(DataConfig(dataset="auto", path=str(tar), eval_path=cifar_test_dir), "train")
    as_folder = build_source(DataConfig(dataset="auto", path=cifar_train_dir, eval_path=cifar_test_dir), "train")
    assert len(as_tar) == len(as_folder) == 300 and list(as_tar.labels) == list(as_folder.labels)
    test = build_source(DataConfig(dataset="auto", path=cifar_train_dir, eval_path=cifar_test_dir), "test")
    assert test.classes == as_folder.classes
