"""Shard lists as users write them (fastclr/data/shards.py): brace ranges and alternatives, globs, folders, text
lists; missing shards and empty matches named."""
import io
import os
import tarfile

import pytest

from fastclr.data.shards import expand_braces, is_shard_list, shard_paths
from fastclr.data.sources import detect_kind, tar_source


def test_brace_ranges_and_alternatives_expand_in_written_order():
    assert expand_braces("train-{000000..000003}.tar") == [f"train-00000{i}.tar" for i in range(4)]
    assert expand_braces("s-{8..11}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]  # no padding asked
    assert expand_braces("s-{09..11}") == ["s-09", "s-10", "s-11"]
    assert expand_braces("s-{3..1}") == ["s-3", "s-2", "s-1"]
    assert expand_braces("{train,extra}-{0..1}.tar") == ["train-0.tar", "train-1.tar", "extra-0.tar", "extra-1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match=r"'\{abc\}' is neither a range"):
        expand_braces("x-{abc}.tar")


def _shard(path, names):
    with tarfile.open(path, "w") as tf:
        for i, name in enumerate(names):
            data = b"\xff\xd8\xff" + bytes([i]) * 20
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    for i in range(4):
        _shard(tmp_path / f"train-{i:06d}.tar", [f"k{i}a.jpg", f"k{i}b.jpg"])
    return tmp_path


def test_every_way_of_naming_shards_gives_the_same_files(shards):
    want = [str(shards / f"train-{i:06d}.tar") for i in range(4)]
    assert shard_paths(str(shards / "train-{000000..000003}.tar")) == want
    assert shard_paths(str(shards / "train-*.tar")) == want
    assert shard_paths(str(shards)) == want
    listing = shards / "shards.txt"
    listing.write_text("# the training shards\n" + "\n".join(os.path.basename(w) for w in want) + "\n")
    assert is_shard_list(str(listing)) and shard_paths(str(listing)) == want
    assert shard_paths(str(shards / "train-{000002,000000}.tar")) == [want[2], want[0]]  # as written
    assert shard_paths(str(shards / "train-{000000..000001}.tar") + "") == want[:2]
    for path in (str(shards / "train-{000000..000003}.tar"), str(listing)):
        assert detect_kind(path) == "tar"
        assert len(tar_source(path)) == 8


def test_missing_shards_and_empty_matches_are_named(shards):
    with pytest.raises(FileNotFoundError, match=r"2 named shard\(s\) do not exist in .*train-000004.tar, "
                                                r"train-000005.tar"):
        shard_paths(str(shards / "train-{000000..000005}.tar"))
    with pytest.raises(FileNotFoundError, match=r"match no file in '.*nowhere' \(that folder does not exist\)"):
        shard_paths(str(shards / "nowhere" / "train-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"match no file in '.*': give a .tar file"):
        shard_paths(str(shards / "val-*.tar"))
    (shards / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"folder '.*empty' holds no \*.tar file"):
        shard_paths(str(shards / "empty"))


def test_a_file_list_of_images_is_not_a_shard_list(tmp_path):
    images = tmp_path / "list.txt"
    images.write_text("a/0001.jpg 3\na/0002.jpg 4\n")
    shards = tmp_path / "train.list"
    shards.write_text("train-000000.tar\n")
    assert not is_shard_list(str(images)) and detect_kind(str(images)) == "filelist"
    assert is_shard_list(str(shards)) and detect_kind(str(shards)) == "tar"
