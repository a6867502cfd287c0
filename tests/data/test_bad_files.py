"""Bad files never stop a run: real CIFAR JPEGs mixed with every kind of broken or odd file."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastclr.config import AugmentConfig, DataConfig
from fastclr.data import TrainLoader
from fastclr.data.loader import EvalLoader
from fastclr.data.screen import OK, SUSPECT, quick_check, screen
from fastclr.data.sources import folder_source, tar_source

from .conftest import _shared_tar

CPU = torch.device("cpu")
IDENTITY = AugmentConfig(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                         blur_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
N_PLAIN = 48


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def _broken_and_odd(jpegs: list[bytes]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(bad files, decodable odd files) by name, each made from a different real image."""
    rng = np.random.default_rng(0)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    damaged_header = bytearray(jpegs[3])
    damaged_header[4:5] = b"\x01"  # first segment length -> 256+: runs past the next marker
    damaged_header[6:40] = rng.integers(0, 256, 34, dtype=np.uint8).tobytes()
    bad = {
        "truncated_scan.jpg": jpegs[0][: len(jpegs[0]) // 2],
        "truncated_header.jpg": jpegs[1][:90],
        "garbage_signature.jpg": b"\x00" * 3 + jpegs[2][3:],
        "damaged_header.jpg": bytes(damaged_header),
        "zero_bytes.jpg": b"",
        "text_named.jpg": b"<html><body>404 not found</body></html>\n" * 8,
        "truncated.png": _encode(pil[4], "PNG")[:-40],
    }
    odd = {
        "alpha.png": _encode(pil[5].convert("RGBA"), "PNG"),
        "gray.jpg": _encode(pil[6].convert("L"), "JPEG", quality=95),
        "cmyk.jpg": _encode(pil[7].convert("CMYK"), "JPEG", quality=95),
        "smaller_than_crop.jpg": _encode(pil[8].resize((7, 5)), "JPEG", quality=95),
        "palette.png": _encode(pil[9].convert("P"), "PNG"),
        "progressive.jpg": _encode(pil[10], "JPEG", quality=95, progressive=True),
        "trailing_bytes.jpg": jpegs[11] + b"\x00junk-after-end-of-image" * 8,
    }
    return bad, odd


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """``root/<class>/`` with N_PLAIN plain CIFAR JPEGs, every bad kind and every decodable odd kind."""
    with tarfile.open(_shared_tar("cifar10-train-10k.tar")) as tf:
        members = [m for m in tf.getmembers() if m.isfile()][: N_PLAIN + 12]
        jpegs = [tf.extractfile(m).read() for m in members]
    bad, odd = _broken_and_odd(jpegs[N_PLAIN:])
    root = tmp_path_factory.mktemp("mixed")
    for cls in ("a", "b"):
        (root / cls).mkdir()
    for k, data in enumerate(jpegs[:N_PLAIN]):
        (root / ("a" if k % 2 else "b") / f"plain{k:03d}.jpg").write_bytes(data)
    for name, data in {**bad, **odd}.items():
        (root / "b" / name).write_bytes(data)
    return str(root), {str(root / "b" / n) for n in bad}, len(jpegs[:N_PLAIN]) + len(odd)


def _views(loader) -> list[np.ndarray]:
    out = []
    for a, b in loader:
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        out.extend(np.round(a.float().numpy() * 255).astype(np.uint8))
    return out


@pytest.mark.parametrize("screened", [True, False], ids=["screen", "decode-failure-recovery"])
def test_a_full_epoch_over_a_folder_with_bad_files(mixed_folder, screened):
    """Every bad file found and named, every good one delivered: with the host screen, and with the screen switched
    off so that the pipeline meets the bad files and must recover from the decoder's failure."""
    root, bad_paths, n_good = mixed_folder
    source = folder_source(root)
    assert len(source) == n_good + len(bad_paths)
    batch = len(source) // 2 if len(source) % 2 == 0 else len(source)
    loader = TrainLoader(source, DataConfig(image_size=32, augment=IDENTITY, num_threads=2), batch_size=batch,
                         device=CPU)
    if not screened:
        loader.bad.screen_fn = lambda buf: None
    views = _views(loader)
    assert len(views) == len(source)  # the batch size held: bad slots were filled
    assert {name for name, _ in loader.bad.names()} == bad_paths
    assert all(reason for _, reason in loader.bad.names())
    # Replacements repeat good images; every good image appears, nothing else does.
    assert len({v.tobytes() for v in views}) == n_good
    assert loader.epoch == 1 and loader.position == 0


def test_evaluation_leaves_bad_files_out_with_label_minus_one(mixed_folder):
    root, bad_paths, n_good = mixed_folder
    source = folder_source(root)
    loader = EvalLoader(source, DataConfig(image_size=32, augment=IDENTITY), batch_size=7, device=CPU)
    labels = torch.cat([y for _, y in loader])
    assert int((labels >= 0).sum()) == n_good
    marked = {source.sample_name(int(i)) for i in loader.indices[(labels < 0).numpy()]}
    assert marked == bad_paths


def test_tar_shards_with_bad_members_are_named_by_shard_and_member(tmp_path):
    with tarfile.open(_shared_tar("cifar10-train-10k.tar")) as tf:
        jpegs = [tf.extractfile(m).read() for m in [m for m in tf.getmembers() if m.isfile()][:20]]
    shard = tmp_path / "shard-0.tar"
    with tarfile.open(shard, "w") as tf:
        for k, data in enumerate(jpegs[:15] + [jpegs[15][:300], b"", b"not an image at all"]):
            info = tarfile.TarInfo(f"{k:05d}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    source = tar_source(str(shard))
    loader = TrainLoader(source, DataConfig(image_size=32, augment=IDENTITY), batch_size=6, device=CPU)
    views = _views(loader)
    assert len(views) == 18
    assert [n for n, _ in loader.bad.names()] == [f"{shard}:{k:05d}.jpg" for k in (15, 16, 17)]
    assert len({v.tobytes() for v in views}) == 15


def test_quick_check_verdicts_and_the_screen(mixed_folder):
    """The cheap check passes ordinary files without a decode and never passes a broken one."""
    root, bad_paths, _ = mixed_folder
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            data = open(path, "rb").read()
            verdict, _ = quick_check(data)
            if path in bad_paths:
                assert verdict != OK, f
                assert screen(data) is not None, f
            else:
                assert screen(data) is None, f
                if f.startswith("plain") or f in ("gray.jpg", "cmyk.jpg", "alpha.png", "progressive.jpg"):
                    assert verdict == OK, f  # no decode needed for ordinary files
    assert quick_check(b"")[0] == "empty file"
    assert quick_check(b"GIF89a....")[0].startswith("not an image")
    assert quick_check(b"\xff\xd8\xff\xe0\x00\x10JFIF")[0] == SUSPECT


def test_training_over_bad_files_runs_an_epoch_and_lists_them(mixed_folder, tmp_path, capsys):
    from tests.helpers import make_trainer as _trainer
    from tests.helpers import tiny_config as _cfg

    root, bad_paths, _ = mixed_folder
    trainer = _trainer(_cfg(tmp_path, "data.dataset=folder", f"data.path={root}", f"data.eval_path={root}",
                            "data.image_size=32", "train.global_batch_size=31", "train.epochs=1"))
    results = trainer.train()
    assert trainer.step == 2 and results["bad_samples"] == len(bad_paths)
    listed = [line.split("\t") for line in open(tmp_path / "bad_samples.rank0.tsv").read().splitlines()]
    assert {name for name, _ in listed} == bad_paths and all(reason for _, reason in listed)
    out = capsys.readouterr().out
    assert f"{len(bad_paths)} bad image(s) skipped" in out and "skipped bad image" in out


@pytest.mark.parametrize("quick", [False, True], ids=["decode", "quick"])
def test_data_check_lists_the_bad_files_and_writes_usable_lists(mixed_folder, tmp_path, quick):
    from fastclr.data.check import check
    from fastclr.data.sources import build_source, filelist_source

    root, bad_paths, n_good = mixed_folder
    summary = check(root, image_size=32, quick=quick, out_dir=str(tmp_path), progress=False)
    assert (summary["good"], summary["bad"]) == (n_good, len(bad_paths))
    listed = [line.split("\t")[0] for line in open(summary["bad_list"]) if not line.startswith("#")]
    assert set(listed) == bad_paths
    assert summary["converted"] == {"RGB with alpha": 1, "grayscale": 1, "CMYK": 1, "palette": 1,
                                    "smaller than the 32-px crop": 1}
    clean = filelist_source(summary["clean_list"])
    assert len(clean) == n_good and not set(clean.paths) & bad_paths
    assert sorted(clean.labels.tolist()) == sorted(folder_source(root).labels[
        [i for i, p in enumerate(folder_source(root).paths) if p not in bad_paths]].tolist())
    # The bad list as data.exclude: the same folder without them, nothing left to screen out.
    excluded = build_source(DataConfig(dataset="folder", path=root, exclude=summary["bad_list"]), "train")
    assert len(excluded) == n_good and not set(excluded.paths) & bad_paths


def test_data_check_command_line(mixed_folder, tmp_path):
    import subprocess
    import sys

    root, bad_paths, n_good = mixed_folder
    run = subprocess.run([sys.executable, "-m", "fastclr", "data", "check", root, "--image-size", "32",
                          "--out-dir", str(tmp_path), "--no-progress"], capture_output=True, text=True,
                         cwd=os.path.join(os.path.dirname(__file__), "..", ".."))
    assert run.returncode == 0, run.stderr
    assert f"{n_good} good, {len(bad_paths)} bad" in run.stdout
    assert all(p in run.stdout for p in bad_paths)
    missing = subprocess.run([sys.executable, "-m", "fastclr", "data", "check", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, cwd=os.path.join(os.path.dirname(__file__), "..", ".."))
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_images_the_gpu_decoder_refuses_are_fed_as_png_with_the_same_pixels(mixed_folder, monkeypatch):
    """A stream the CPU decoder reads but the GPU (nvJPEG) decoder refuses: the loader's recovery decodes it on the
    CPU and feeds the same pixels as PNG. The GPU verdict is simulated here (no GPU): every ``cmyk``/``progressive``
    file is 'refused'; the recovery itself, the re-encoding and the pipeline are the real ones."""
    import fastclr.data.loader as loader_module
    from fastclr.data.screen import as_png, pixels

    root, bad_paths, _ = mixed_folder
    source = folder_source(root)
    refused = {i for i, p in enumerate(source.paths) if any(k in p for k in ("cmyk", "progressive"))}
    assert len(refused) == 2
    for i in refused:
        original = source.read(np.array([i]))[0]
        assert np.array_equal(pixels(as_png(original))[0], pixels(original)[0])
    cfg = DataConfig(dataset="folder", path=root, eval_path=root, image_size=16, augment=IDENTITY)
    loader = TrainLoader(source, cfg, batch_size=len(source) // 2, device=CPU)
    monkeypatch.setattr(loader_module, "decodes_on_gpu",
                        lambda buf, device_id: "refused" if any(np.array_equal(buf, source.read(np.array([i]))[0])
                                                                for i in refused) else None)
    loader._device_id = 0  # what a GPU loader has; only _blame reads it here
    found = loader._blame(0, 2)
    loader._device_id = None
    assert set(loader.reencoded) == refused and found >= len(refused)
    assert not any(i in refused for i in loader.bad.bad)  # not bad: fed as PNG instead
    batches = list(loader)
    assert len(batches) == 2 and all(torch.isfinite(a).all() for a, _ in batches)
