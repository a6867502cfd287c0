"""A decoder that segfaults costs one verdict, not the process: the screen and ``data check`` decode in a child
(:mod:`fastclr.data.decoder`) that is restarted after a crash.

The crash is injected: :func:`crash_on_marker` (imported by the child through ``decoder.DECODE_FN`` or the
``FASTCLR_DECODE_FN`` environment variable) kills its own process with SIGSEGV when an image holds :data:`MARKER`, and
otherwise defers to the real DALI decode. Keep this module's top-level imports light: the child imports it."""
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest

MARKER = b"FASTCLR-TEST-SEGFAULT"
CRASH_FN = "tests.data.test_decoder_crash:crash_on_marker"
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def crash_on_marker(bufs, **kw):
    """A decode function for the decoder child: SIGSEGV on :data:`MARKER`, the real decode otherwise."""
    if any(MARKER in bytes(b) for b in bufs):
        os.kill(os.getpid(), signal.SIGSEGV)
    from fastclr.data.decoder import dali_decode

    return dali_decode(bufs, **kw)


@pytest.fixture(scope="module")
def jpegs():
    from .conftest import _shared_tar

    with tarfile.open(_shared_tar("cifar10-test-2k.tar")) as tf:
        return [tf.extractfile(m).read() for m in [m for m in tf.getmembers() if m.isfile()][:12]]


@pytest.fixture(scope="module")
def crashing_decoder():
    """This process's decoder child runs :func:`crash_on_marker`; the real decoder again afterwards."""
    from fastclr.data import decoder

    decoder.DECODE_FN = CRASH_FN
    decoder.restart()
    yield decoder
    decoder.DECODE_FN = None
    decoder.restart()


def _marked(jpeg: bytes) -> bytes:
    # Past the 64 bytes of slack after the end-of-image marker: the cheap check calls it suspect, so even the screen
    # and --quick decode it (and without the injection DALI would decode it fine).
    return jpeg + MARKER * 8


def _trailing(jpeg: bytes) -> bytes:
    return jpeg + b"\x00junk-after-end-of-image" * 8  # suspect to the cheap check, decodable


def _reaped(pid: int) -> bool:
    """True if ``pid`` is no longer a child of ours: it exited and was waited for (no zombie left)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False  # still ours: running, or a zombie nobody waited for


def _exited(pid: int) -> bool:
    """True if ``pid`` is gone or a zombie (an orphan's zombie is its new parent's to reap)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_crash_is_a_verdict_and_the_restarted_child_decodes_the_next_file(crashing_decoder, jpegs):
    from fastclr.data.screen import OK, SUSPECT, as_png, decodes, pixels, quick_check, screen

    decoder = crashing_decoder
    assert screen(_trailing(jpegs[0])) is None and quick_check(_trailing(jpegs[0]))[0] == SUSPECT
    first = decoder.child_pid()
    assert first is not None

    reason = screen(_marked(jpegs[1]))
    assert reason is not None and "decoder crashed (SIGSEGV)" in reason and reason.startswith("truncated or corrupt")
    assert decoder.child_pid() is None and _reaped(first)  # reaped: no zombie

    # The next suspect file: a fresh child, the real verdicts and pixels.
    assert screen(_trailing(jpegs[2])) is None
    second = decoder.child_pid()
    assert second is not None and second != first
    assert "not decodable" in decodes(jpegs[3][: len(jpegs[3]) // 2])
    image, why = pixels(_trailing(jpegs[4]))
    assert why is None and np.array_equal(image, pixels(jpegs[4])[0]) and image.shape == (32, 32, 3)
    assert quick_check(as_png(jpegs[4]))[0] == OK
    assert decoder.child_pid() == second  # a bad file is a verdict, not a restart

    assert "decoder crashed" in decodes(_marked(jpegs[5]))
    assert _reaped(second)
    with pytest.raises(ValueError, match="decoder crashed"):
        as_png(_marked(jpegs[5]))
    assert decodes(jpegs[6]) is None


def test_a_crashing_batch_is_decoded_file_by_file(crashing_decoder, jpegs):
    from fastclr.data.decoder import decode

    bufs = [jpegs[0], jpegs[1][:200], _marked(jpegs[2]), b"not an image", _trailing(jpegs[3])]
    reasons = [r for _, r in decode(bufs, threads=2)]
    assert reasons[0] is None and reasons[4] is None
    assert "not decodable" in reasons[1] and "not decodable" in reasons[3]
    assert reasons[2] == "decoder crashed (SIGSEGV)"


def test_threads_share_the_child_through_a_crash(crashing_decoder, jpegs):
    """The loader screens on its read-ahead thread while the main thread may decode: every verdict stays right."""
    from fastclr.data.screen import screen

    verdicts: dict[tuple[int, int], str | None] = {}

    def work(t: int):
        for k in range(4):
            buf = _marked(jpegs[k]) if (t, k) == (0, 1) else _trailing(jpegs[4 * t + k])
            verdicts[t, k] = screen(buf)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert "decoder crashed" in verdicts.pop((0, 1))
    assert set(verdicts.values()) == {None} and len(verdicts) == 7


def _dataset(jpegs: list[bytes]) -> tuple[dict[str, bytes], dict[str, str]]:
    """(files by name, the words expected in each bad file's reason)."""
    files = {f"good{k}.jpg": jpegs[k] for k in range(6)}
    files.update({"a_crash.jpg": _marked(jpegs[6]), "b_trailing.jpg": _trailing(jpegs[7]),
                  "truncated.jpg": jpegs[8][: len(jpegs[8]) // 2], "empty.jpg": b"", "text.jpg": b"<html>404</html>"})
    bad = {"a_crash.jpg": "decoder crashed (SIGSEGV)", "truncated.jpg": "not decodable", "empty.jpg": "empty file",
           "text.jpg": "not an image"}
    return files, bad


@pytest.mark.parametrize("quick", [False, True], ids=["decode", "quick"])
@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_data_check_goes_on_past_a_crashing_file(crashing_decoder, jpegs, tmp_path, layout, quick):
    from fastclr.data.check import check

    files, bad = _dataset(jpegs)
    if layout == "folder":
        (tmp_path / "data" / "cls").mkdir(parents=True)
        for name, data in files.items():
            (tmp_path / "data" / "cls" / name).write_bytes(data)
        path = str(tmp_path / "data")
    else:
        path = str(tmp_path / "data.tar")
        with tarfile.open(path, "w") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    summary = check(path, image_size=32, quick=quick, out_dir=str(tmp_path / "out"), progress=False, threads=2)
    assert (summary["good"], summary["bad"]) == (len(files) - len(bad), len(bad))
    listed = dict(line.rstrip("\n").split("\t") for line in open(summary["bad_list"]) if not line.startswith("#"))
    assert {os.path.basename(name.split(":")[-1]) for name in listed} == set(bad)
    for name, reason in listed.items():
        expected = bad[os.path.basename(name.split(":")[-1])]
        assert expected in reason, (name, reason)
        assert "crashed" not in reason or expected.startswith("decoder crashed"), (name, reason)


def test_the_environment_variable_injects_the_crash_into_a_command_and_the_child_exits_with_it(jpegs, tmp_path):
    """``FASTCLR_DECODE_FN`` reaches a child of a process started as a subprocess (how a training run is given it);
    the command still ends normally, and so does its decoder child."""
    files, bad = _dataset(jpegs)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    listing = tmp_path / "files.txt"
    listing.write_text("".join(f"{tmp_path / name}\n" for name in files))
    env = {**os.environ, "FASTCLR_DECODE_FN": CRASH_FN, "PYTHONPATH": os.path.abspath(ROOT)}
    script = ("import sys; from fastclr.data import check, decoder; check.check(sys.argv[1], quick=True, "
              "out_dir=sys.argv[2], progress=False); print('child', decoder.child_pid())")
    run = subprocess.run([sys.executable, "-c", script, str(listing), str(tmp_path / "out")], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"{tmp_path / 'a_crash.jpg'}: truncated or corrupt JPEG: decoder crashed (SIGSEGV)" in run.stdout
    assert _exited(int(run.stdout.split("child ")[-1]))


def test_the_child_exits_when_its_parent_is_killed():
    script = ("import time; from fastclr.data import decoder, screen; screen.decodes(b'\\xff\\xd8\\xff'); "
              "print(decoder.child_pid(), flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        child = int(parent.stdout.readline())
        assert not _exited(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while not _exited(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _exited(child)  # it polls for its parent once a second
    finally:
        parent.kill()
        parent.wait()


def test_a_training_run_outlives_a_decoder_crash(crashing_decoder, tmp_path):
    """Pretraining on a tar where one image crashes the decoder: the run completes every step, that image is listed
    bad ("decoder crashed"), a decodable suspect image decoded by the restarted child is used, nothing else is lost."""
    import json

    from tests.helpers import make_trainer, tiny_config
    from .conftest import _shared_tar

    with tarfile.open(_shared_tar("cifar10-test-2k.tar")) as tf:
        members = [m for m in tf.getmembers() if m.isfile()][:190]
        images = {m.name: tf.extractfile(m).read() for m in members}  # <split>/<class>/<file>: labelled
    names = sorted(images)
    images[names[7]] = _marked(images[names[7]])
    images[names[8]] = _trailing(images[names[8]])
    shard = tmp_path / "train.tar"
    with tarfile.open(shard, "w") as tf:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(images[name])
            tf.addfile(info, io.BytesIO(images[name]))
    cfg = tiny_config(tmp_path / "run", f"data.path={shard}", f"data.eval_path={shard}", "data.dataset=tar",
                      "data.image_size=16", "train.epochs=2", "train.global_batch_size=64", "eval.baseline=false",
                      "eval.probe_epochs=1", "eval.max_eval_images=64")
    trainer = make_trainer(cfg)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert trainer.step == trainer.total_steps == 4 and len([r for r in rows if r["kind"] == "train"]) == 4
    listed = (tmp_path / "run" / "bad_samples.rank0.tsv").read_text().strip().splitlines()
    listed = [line for line in listed if not line.startswith("#")]
    assert len(listed) == 1 and listed[0].startswith(f"{shard}:{names[7]}\t") and "decoder crashed" in listed[0]
