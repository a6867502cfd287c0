"""The cached sample index (fastclr.data.index): the same listing as Python's tarfile and os.walk give, built once
and reused across processes, rebuilt with a warning when stale or damaged, placed beside the data or in the cache
folder, and the same batches from a training loader as before."""
import io
import os
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch

from fastclr.config import DataConfig
from fastclr.data import index
from fastclr.data.loader import TrainLoader
from fastclr.data.prepare import prepare
from fastclr.data.sources import FileSource, TarSource, folder_source, tar_source
from fastclr.data.tables import Strings
from tests.helpers import ROOT, subprocess_env


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12 + seed % 5, 9 + seed % 7, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def _add(tf, name: str, data: bytes = b"", kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    if kind == tarfile.SYMTYPE:
        info.linkname, info.size = "elsewhere.jpg", 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _reference(files: list[str]):
    """The listing the library made before the index, with tarfile: (shard, name, offset, size, explicit label)."""
    rows = []
    for t, path in enumerate(files):
        explicit = {}
        with tarfile.open(path, "r:") as tf:
            members = [m for m in tf if m.isfile()]
            for m in members:
                if m.name.lower().endswith((".cls", ".label")):
                    explicit[m.name.rsplit("/", 1)[-1].split(".")[0], os.path.dirname(m.name)] = int(
                        tf.extractfile(m).read())
            for m in members:
                if m.name.lower().endswith((".jpg", ".jpeg", ".png")):
                    key = (m.name.rsplit("/", 1)[-1].split(".")[0], os.path.dirname(m.name))
                    rows.append((t, m.name, m.offset_data, m.size, explicit.get(key, -1)))
    return rows


@pytest.fixture
def odd_shards(tmp_path):
    """Three shards in the formats tar writers produce: GNU long names, pax headers, ustar name prefixes, folders,
    links, labels before and after their image, non-ASCII names, images with no label."""
    long_dir = "d" * 120
    specs = [(tarfile.GNU_FORMAT, [f"{long_dir}/a.jpg", "b.cls", "b.jpg", "dir/"]),
             (tarfile.PAX_FORMAT, ["x/é-ü.jpg", "x/é-ü.cls", "link.jpg", f"{long_dir}/{'n' * 110}.png", "c.txt"]),
             (tarfile.USTAR_FORMAT, [f"{'p' * 90}/{'q' * 60}/k.jpeg", "plain.jpg", "plain.label"])]
    files, seed = [], 0
    for s, (fmt, names) in enumerate(specs):
        path = tmp_path / f"odd-{s}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            for name in names:
                seed += 1
                if name.endswith("/"):
                    _add(tf, name.rstrip("/"), kind=tarfile.DIRTYPE)
                elif name == "link.jpg":
                    _add(tf, name, kind=tarfile.SYMTYPE)
                elif name.endswith((".cls", ".label")):
                    _add(tf, name, f" {seed}\n".encode())
                else:
                    _add(tf, name, _jpeg(seed))
        files.append(str(path))
    return files


def test_tar_index_lists_what_tarfile_lists(odd_shards):
    src = tar_source(os.path.join(os.path.dirname(odd_shards[0]), "odd-{0..2}.tar"))
    ref = _reference(odd_shards)
    assert len(src) == len(ref) == 6
    assert [(int(src.tar_index[i]), src.members[i], int(src.offsets[i]), int(src.sizes[i]), int(src.labels[i]))
            for i in range(len(src))] == ref
    for i, (t, name, offset, size, _) in enumerate(ref):
        with tarfile.open(odd_shards[t]) as tf:
            assert src.read(np.array([i]))[0].tobytes() == tf.extractfile(name).read()
    assert src.sample_name(0) == f"{odd_shards[0]}:{'d' * 120}/a.jpg"


def test_the_index_is_built_once_and_memory_mapped_by_the_next_process(odd_shards, tmp_path):
    """A second process reads the cache file (no shard is opened): the shards are replaced by files that are not
    tars at all but keep their size and modification time, and the listing still comes back."""
    pattern = os.path.join(os.path.dirname(odd_shards[0]), "odd-*.tar")
    first = tar_source(pattern)
    place = index.cache_file(pattern, "tar")
    assert place and place.startswith(os.environ["FASTCLR_INDEX_DIR"])
    assert isinstance(first.offsets, np.memmap) and isinstance(first.members, Strings)
    for f in odd_shards:
        st = os.stat(f)
        with open(f, "r+b") as fh:
            fh.write(b"\x00" * 512)  # header checksums broken: a scan would fail
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    code = ("import sys; from fastclr.data.sources import tar_source; s = tar_source(sys.argv[1]); "
            "print(len(s), list(s.members), s.labels.tolist())")
    out = subprocess.run([sys.executable, "-c", code, pattern], capture_output=True, text=True, cwd=ROOT,
                         env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{len(first)} {list(first.members)} {first.labels.tolist()}"


def test_a_stale_or_damaged_index_is_rebuilt_with_a_warning(odd_shards):
    pattern = os.path.join(os.path.dirname(odd_shards[0]), "odd-*.tar")
    tar_source(pattern)
    place = index.cache_file(pattern, "tar")
    index._LOADED.clear()
    with open(place, "r+b") as f:  # damage one byte of the arrays
        f.seek(-40, os.SEEK_END)
        byte = f.read(1)
        f.seek(-40, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(UserWarning, match="checksum.*rebuilding"):
        assert len(tar_source(pattern)) == 6
    index._LOADED.clear()
    with tarfile.open(odd_shards[2], "a") as tf:  # the data changes: one more image
        _add(tf, "new.jpg", _jpeg(99))
    with pytest.warns(UserWarning, match="data changed.*rebuilding"):
        src = tar_source(pattern)
    assert len(src) == 7 and src.members[6] == "new.jpg"
    index._LOADED.clear()
    with open(place, "wb") as f:
        f.write(b"garbage")
    with pytest.warns(UserWarning, match="not a fastclr index"):
        assert len(tar_source(pattern)) == 7
    index._LOADED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # valid again: read quietly
        assert len(tar_source(pattern)) == 7


def test_the_index_lies_beside_the_data_or_in_the_cache_folder(odd_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("FASTCLR_INDEX_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    index._LOADED.clear()
    real = [os.path.realpath(f) for f in odd_shards]
    beside = os.path.join(os.path.dirname(real[0]), index._file_name("tar", real))
    tar_source(os.path.dirname(odd_shards[0]))  # the folder of shards
    assert os.path.isfile(beside)
    # Where the data folder takes no file (here: a folder stands in the way), the cache folder is used.
    index._LOADED.clear()
    other = odd_shards[:2]
    blocked = os.path.join(os.path.dirname(real[0]), index._file_name("tar", [os.path.realpath(f) for f in other]))
    os.makedirs(blocked)
    src = tar_source(os.path.join(os.path.dirname(odd_shards[0]), "odd-{0,1}.tar"))
    assert len(src) == 4
    assert os.path.isfile(os.path.join(str(tmp_path / "xdg"), "fastclr", os.path.basename(blocked)))


def test_compressed_and_cut_off_shards(tmp_path):
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tf:
        _add(tf, "a.jpg", _jpeg(1) * 40)
    with pytest.raises(ValueError, match="uncompressed.*gzip"):
        tar_source(str(tmp_path / "gz.tar"))
    with tarfile.open(tmp_path / "cut.tar", "w") as tf:
        _add(tf, "a.jpg", _jpeg(1))
        _add(tf, "b.jpg", _jpeg(2) * 3)
    with tarfile.open(tmp_path / "cut.tar") as tf:
        b = tf.getmember("b.jpg")
    os.truncate(tmp_path / "cut.tar", b.offset_data + b.size // 2)  # end-of-archive gone and b.jpg cut short
    with pytest.warns(UserWarning, match="ends inside member 'b.jpg'"):
        assert list(tar_source(str(tmp_path / "cut.tar")).members) == ["a.jpg"]


# --------------------------------------------------------------------------------------------------------------- #
# Folders


def _walk_reference(root: str) -> list[str]:
    out = []
    for c in sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, c)):
            dirnames.sort()
            out += [os.path.join(dirpath, f) for f in sorted(filenames)
                    if f.lower().endswith((".jpg", ".png")) and not f.startswith(".")]
    return out


def test_folder_index_lists_what_a_walk_lists_and_notices_new_files(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTCLR_INDEX_DIR")  # the index goes into the folder itself, beside its class folders
    index._LOADED.clear()
    root = tmp_path / "train"
    for path in ["b/2.jpg", "b/10.jpg", "a/sub/z.png", "a/y.JPG", "a/.hidden.jpg", "a/notes.txt", "c/deep/er/q.jpg"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(_jpeg(len(path)))
    src = folder_source(str(root))
    assert list(src.paths) == _walk_reference(str(root)) and src.labels.tolist() == [0, 0, 1, 1, 2]
    assert src.classes == ("a", "b", "c")
    index._LOADED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unchanged (the index file beside the classes changes nothing): reused
        assert index.folder_table(str(root), src.classes, build=False) is not None
    index._LOADED.clear()
    (root / "c" / "deep" / "er" / "r.jpg").write_bytes(_jpeg(3))  # a nested folder's time changes
    with pytest.warns(UserWarning, match="data changed.*rebuilding"):  # seen by re-stating the walked folders
        src = folder_source(str(root))
    assert list(src.paths) == _walk_reference(str(root)) and len(src) == 6
    held_out = tmp_path / "val"
    (held_out / "c").mkdir(parents=True)
    (held_out / "c" / "v.jpg").write_bytes(_jpeg(5))
    val = folder_source(str(held_out), src.classes)
    assert val.labels.tolist() == [2] and val.paths[0] == str(held_out / "c" / "v.jpg")
    assert index.cache_file(str(root), "folder").startswith(str(root))


def test_the_same_batches_as_the_listing_before_the_index(odd_shards, tmp_path):
    """A training loader over the index-backed source and over the same samples listed by tarfile (the listing
    before the index) yields the same pixels, batch for batch, across an epoch boundary."""
    pattern = os.path.join(os.path.dirname(odd_shards[0]), "odd-*.tar")
    ref = _reference(odd_shards)
    by_tarfile = TarSource(odd_shards, np.array([r[0] for r in ref], np.int32), np.array([r[2] for r in ref]),
                           np.array([r[3] for r in ref]), np.array([r[4] for r in ref]), name=pattern,
                           members=[r[1] for r in ref])
    cfg = DataConfig(dataset="tar", path=pattern, image_size=8, seed=3)

    def batches(source):
        loader = TrainLoader(source, cfg, batch_size=2, device=torch.device("cpu"))
        out = [torch.cat(b) for _ in range(2) for b in loader]
        loader.close()
        return out

    for a, b in zip(batches(tar_source(pattern)), batches(by_tarfile), strict=True):
        assert torch.equal(a, b)
    root = tmp_path / "folder"
    for i in range(6):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}" / f"{i}.jpg").write_bytes(_jpeg(i))
    listed = FileSource(_walk_reference(str(root)), np.array([0, 0, 0, 1, 1, 1]), name=str(root))
    for a, b in zip(batches(folder_source(str(root))), batches(listed), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["shards", "folder"])
def test_exact_resume_over_indexed_data(tmp_path, layout):
    """S steps, a stop with a checkpoint, a new trainer that lists the data from the cached index, S more: the same
    losses and parameters as 2·S steps in one go (order, bad-sample screening and augmentation all resume)."""
    from benchmarks.synthetic_imagenet import generate
    from tests.helpers import make_trainer, tiny_config

    generate(str(tmp_path / "data"), 600, 10, shards=3, layout="both" if layout == "folder" else "shards", seed=1)
    path = str(tmp_path / "data" / ("folder" if layout == "folder" else "train-{000000..000002}.tar"))
    common = [f"data.path={path}", f"data.eval_path={path}", "data.dataset=auto", "data.image_size=16",
              "train.epochs=3", "train.global_batch_size=128", "eval.max_eval_images=64", "eval.probe_epochs=1",
              "eval.baseline=false"]
    whole = make_trainer(tiny_config(tmp_path / "whole", *common, "train.stop_at_step=6"))
    whole.train()
    index._LOADED.clear()  # each start lists the data afresh: from the cache file
    first = make_trainer(tiny_config(tmp_path / "split", *common, "train.stop_at_step=3"))
    first.train()
    index._LOADED.clear()
    second = make_trainer(tiny_config(tmp_path / "split", *common, "train.stop_at_step=6"))
    second.train()

    def losses(run):
        import json

        rows = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]

    assert second.step == 6 and losses("split") == losses("whole") and len(losses("whole")) == 6
    want = whole.model.state_dict()
    for k, v in second.model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_prepare_builds_on_rank_0_in_a_child_process_and_the_ranks_map_it(odd_shards, tmp_path):
    """A job's start: rank 0 finds no index and has ``fastclr data index`` build it in a child (its allocations
    leave with the child); the listing then comes from the file. A valid index is not rebuilt."""
    from types import SimpleNamespace

    pattern = os.path.join(os.path.dirname(odd_shards[0]), "odd-*.tar")
    folder = tmp_path / "folder"
    (folder / "k").mkdir(parents=True)
    (folder / "k" / "a.jpg").write_bytes(_jpeg(1))
    cfg = DataConfig(dataset="auto", path=pattern, eval_path=str(folder))
    index._LOADED.clear()
    prepare(cfg, SimpleNamespace(rank=0, world_size=1))
    assert not index._LOADED  # built elsewhere: nothing listed in this process yet
    place = index.cache_file(pattern, "tar")
    assert place and place.startswith(os.environ["FASTCLR_INDEX_DIR"]) and index.cache_file(str(folder), "folder")
    built = os.stat(place).st_mtime_ns
    prepare(cfg, SimpleNamespace(rank=0, world_size=1))
    assert os.stat(place).st_mtime_ns == built and len(tar_source(pattern)) == 6
    prepare(cfg, SimpleNamespace(rank=1, world_size=1))  # other ranks only wait (and list later)
