"""Label subsets: class-balanced, deterministic from the seed, written and read back as file lists; the
google-research/simclr imagenet_subsets form (bare file names) matched against folder and tar datasets."""
import os
import tarfile

import numpy as np
import pytest

from fastclr.data.sources import FileSource, digits_source, tar_source
from fastclr.data.subsets import balanced_subset, read_subset, write_subset


def test_balanced_deterministic_and_seed_dependent():
    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140])  # unequal classes, 950
    a, b = balanced_subset(labels, 0.1, seed=0), balanced_subset(labels, 0.1, seed=0)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0)
    per_class = np.bincount(labels[a], minlength=10)
    assert per_class.tolist() == [round(0.1 * 950 / 10)] * 10  # 10 of every class, whatever its size
    other = balanced_subset(labels, 0.1, seed=1)
    assert not np.array_equal(a, other) and np.bincount(labels[other]).tolist() == per_class.tolist()
    assert len(balanced_subset(labels, 1.0, seed=0)) == 950


def test_small_classes_give_what_they_have_and_unlabelled_samples_are_never_drawn():
    labels = np.array([0] * 100 + [1] * 2 + [-1] * 50)
    chosen = balanced_subset(labels, 0.5, seed=3)
    assert (labels[chosen] >= 0).all()
    assert np.bincount(labels[chosen]).tolist() == [26, 2]  # round(0.5·102/2) = 26 per class; class 1 has 2
    with pytest.raises(ValueError, match="no labels"):
        balanced_subset(np.full(5, -1), 0.1, 0)
    with pytest.raises(ValueError, match="fraction"):
        balanced_subset(labels, 0.0, 0)


def test_written_list_reads_back_to_the_same_samples(tmp_path):
    source = digits_source("train", 8)
    chosen = balanced_subset(source.labels, 0.1, seed=0)
    path = write_subset(source, chosen, str(tmp_path / "labels.txt"), header="10% of the digits")
    assert open(path).readline().startswith("# 10% of the digits")
    assert np.array_equal(read_subset(source, path), chosen)


def _imagenet_like(root):
    """An ImageNet-style folder: <wnid>/<wnid>_<n>.JPEG (the file names imagenet_subsets lists)."""
    paths, labels = [], []
    for c, wnid in enumerate(("n01440764", "n01443537")):
        os.makedirs(root / wnid)
        for n in (10026, 7, 33):
            p = root / wnid / f"{wnid}_{n}.JPEG"
            p.write_bytes(b"\xff\xd8")
            paths.append(str(p))
            labels.append(c)
    return FileSource(paths, np.array(labels), name=str(root))


def test_reads_google_research_imagenet_subsets_file_names(tmp_path):
    source = _imagenet_like(tmp_path / "train")
    listed = tmp_path / "1percent.txt"
    listed.write_text("n01443537_7.JPEG\nn01440764_10026.JPEG\n\n")
    chosen = read_subset(source, str(listed))
    assert [os.path.basename(source.paths[i]) for i in chosen] == ["n01440764_10026.JPEG", "n01443537_7.JPEG"]
    listed.write_text("n01440764_10026.JPEG\nn09999999_1.JPEG\n")
    with pytest.raises(ValueError, match="1 of its 2 names are not samples.*n09999999_1.JPEG"):
        read_subset(source, str(listed))


def test_tar_members_match_by_path_and_ambiguous_names_are_refused(tmp_path):
    tar = tmp_path / "train.tar"
    with tarfile.open(tar, "w") as tf:
        for cls in ("cat", "dog"):
            for n in range(3):
                src = tmp_path / f"{cls}{n}.jpg"
                src.write_bytes(b"\xff\xd8")
                tf.add(src, arcname=f"train/{cls}/{n:04d}.jpg")
    source = tar_source(str(tar))
    chosen = balanced_subset(source.labels, 0.34, seed=0)  # 1 of each class
    path = write_subset(source, chosen, str(tmp_path / "labels.txt"))
    assert all(line.startswith("train/") for line in open(path))  # members, not absolute tar paths
    assert np.array_equal(read_subset(source, path), chosen)
    (tmp_path / "bare.txt").write_text("0001.jpg\n")  # in both class folders
    with pytest.raises(ValueError, match="names 2 samples.*write more of its path"):
        read_subset(source, str(tmp_path / "bare.txt"))
