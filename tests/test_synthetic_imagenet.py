"""benchmarks.synthetic_imagenet: shards any tar reader and fastclr's sources read back, images that decode to the
planned sizes, labels that agree between shards and folders, unique bytes, and byte-identical output per seed."""
import hashlib
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from benchmarks.synthetic_imagenet import SHAPES, generate, main, plan, shard_pattern

N, C, S = 203, 13, 4
"""Irregular on purpose: shards of 50 and 51 images, classes of 15 and 16."""


def _hashes(root: str) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    return out, generate(out, N, C, shards=S, layout="both", seed=3)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    runs = [_hashes(generate(str(tmp_path / name), 40, 5, shards=2, layout="both", seed=seed)["out_dir"])
            for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert len(runs[0]) == 2 + 40 and runs[0] == runs[1]
    assert len(runs[2]) == len(runs[0]) and not set(runs[2].values()) & set(runs[0].values()), "no file in common"


def test_shards_are_the_brace_pattern_and_nothing_else(both):
    from fastclr.data.shards import shard_paths

    out, r = both
    assert r["pattern"] == "train-{000000..000003}.tar" and r["shards"] == S
    assert sorted(f for f in os.listdir(out) if f != "folder") == [f"train-{s:06d}.tar" for s in range(S)]
    assert shard_paths(os.path.join(out, r["pattern"])) == [os.path.join(out, f"train-{s:06d}.tar") for s in range(S)]


def test_tarfile_reads_every_member_and_images_decode_to_the_planned_size(both):
    out, _ = both
    labels, shapes, _ = plan(N, C, seed=3)
    seen, jpegs = [], set()
    for s in range(S):
        with tarfile.open(os.path.join(out, f"train-{s:06d}.tar"), mode="r:") as tf:
            members = tf.getmembers()
            assert all(m.isfile() and m.mode == 0o644 for m in members)
            for jpg, cls in zip(members[::2], members[1::2]):  # <key>.jpg then <key>.cls, in that order
                key = jpg.name[:-len(".jpg")]
                assert jpg.name.endswith(".jpg") and cls.name == f"{key}.cls"
                i, label = int(key.split("_")[1]), int(tf.extractfile(cls).read())
                assert key == f"n{label:08d}_{i:08d}" and label == labels[i]
                data = tf.extractfile(jpg).read()
                assert len(data) == jpg.size
                img = Image.open(io.BytesIO(data))
                img.load()  # the whole stream decodes, not just the header
                assert img.format == "JPEG" and img.mode == "RGB" and img.size == SHAPES[shapes[i]][:2]
                w, h = SHAPES[shapes[i]][:2]
                assert img.info["comment"] == f"{key} {w}x{h} seed 3".encode(), "the COM segment is framed exactly"
                seen.append(i), jpegs.add(data)
        assert len(members) == 2 * (N * (s + 1) // S - N * s // S)
    assert seen == list(range(N)), "every sample once, shards in index order"
    assert len(jpegs) == N, "every file's bytes are unique"
    assert set(labels.tolist()) == set(range(C))


def test_folder_labels_agree_with_shard_labels(both):
    from fastclr.data.sources import folder_source, tar_source

    out, r = both
    shards = tar_source(os.path.join(out, r["pattern"]))
    folder = folder_source(os.path.join(out, "folder"))
    assert folder.classes == tuple(f"n{c:08d}" for c in range(C))
    by_key = {os.path.basename(p).split(".")[0]: int(y) for p, y in zip(folder.paths, folder.labels)}
    tar_keys = [m.split(".")[0] for m in shards.members]
    assert by_key == dict(zip(tar_keys, shards.labels.tolist()))
    for p, y in zip(folder.paths, folder.labels):
        assert os.path.basename(os.path.dirname(p)) == f"n{y:08d}" and p.endswith(".JPEG")


def test_cli_default_shard_count_prefix_and_summary(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert main([out, "--images", "1251", "--classes", "2", "--shard-prefix", "val"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("synthetic_imagenet: 1251 images, 2 classes, 2 shards val-{000000..000001}.tar")
    assert line.endswith("images/s") and "mean " in line
    assert sorted(os.listdir(out)) == ["val-000000.tar", "val-000001.tar"], "no temporaries, no folder tree"
    with tarfile.open(os.path.join(out, "val-000001.tar")) as tf:
        assert len(tf.getnames()) == 2 * 626


def test_folder_only_layout_and_bad_arguments(tmp_path):
    r = generate(str(tmp_path), 30, 3, layout="folder")
    assert r["shards"] == 0 and os.listdir(tmp_path) == ["folder"]
    assert sum(len(os.listdir(tmp_path / "folder" / f"n{c:08d}")) for c in range(3)) == 30
    with pytest.raises(ValueError, match="layout"):
        generate(str(tmp_path), 30, 3, layout="tar")
    with pytest.raises(ValueError, match="--shards"):
        generate(str(tmp_path), 30, 3, shards=31)
    assert shard_pattern("train", 1025) == "train-{000000..001024}.tar"


def test_mean_size_is_imagenet_like():
    """Near the commonly quoted ImageNet-1k train averages (about 400x350 to 470x390), landscape like ImageNet."""
    _, shapes, _ = plan(100_000, 1000, seed=0)
    w, h = np.array([s[:2] for s in SHAPES])[shapes].mean(0)
    assert 440 < w < 500 and 360 < h < 420 and w > h, (w, h)
