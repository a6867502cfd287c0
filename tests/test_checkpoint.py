"""The checkpoint module on its own: run state, RNG streams, resume compatibility, atomic files."""
import random

import numpy as np
import pytest
import torch

from fastclr import atomic, checkpoint
from fastclr.checkpoint import RunState
from fastclr.config import ConfigError, check_resume_compatible, load_config, to_dict


def test_run_state_round_trips_through_the_client_state():
    cfg = load_config(None, ["train.epochs=3"])
    state = RunState(step=17, nonfinite_steps=2)
    client = state.to_client(cfg, world_size=4, steps_per_epoch=5)
    assert client["epoch"] == 3 and client["world_size"] == 4 and client["config"] == to_dict(cfg)
    assert RunState.from_client(client) == state
    assert RunState.from_client({"step": 3}) == RunState(step=3)  # older checkpoints lack the newer fields


def test_rng_state_restores_every_stream():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = checkpoint.rng_state()
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(saved)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_resume_refuses_another_model_naming_the_field():
    saved = to_dict(load_config(None, ["model.arch=resnet50"]))
    with pytest.raises(ConfigError, match="'model.arch'.*trained with arch='resnet50'.*'resnet18'"):
        check_resume_compatible(saved, load_config(None, []), "ckpt/step1")
    check_resume_compatible(saved, load_config(None, ["model.arch=resnet50", "optim.base_lr=2"]), "ckpt/step1")
    check_resume_compatible({}, load_config(None, []), "ckpt/old")  # no config saved: nothing to compare


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic.write_bytes(str(path), b"old")
    atomic.write_bytes(str(path), b"new content")
    assert path.read_bytes() == b"new content"
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]
    atomic.torch_save({"x": torch.arange(3)}, str(tmp_path / "t.pt"))
    assert torch.equal(torch.load(tmp_path / "t.pt")["x"], torch.arange(3))


def test_resolve_names_what_is_not_a_checkpoint(tmp_path):
    assert checkpoint.resolve(str(tmp_path), "auto") is None
    assert checkpoint.resolve(str(tmp_path), "none") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve(str(tmp_path), "step000000003")


# --------------------------------------------------------------------------------------------------------------- #
# Damaged checkpoints and full disks


@pytest.fixture(scope="module")
def two_checkpoints_run(tmp_path_factory):
    """A run that left complete checkpoints at steps 2 and 4 (keep=2) in <folder>/ckpt."""
    from tests.helpers import make_trainer, tiny_config

    run = tmp_path_factory.mktemp("two")
    make_trainer(tiny_config(run, "train.epochs=1", "train.stop_at_step=4", "checkpoint.every_steps=2",
                             "eval.max_eval_images=64")).train()
    assert checkpoint.complete_tags(str(run / "ckpt")) == [(2, "step000000002"), (4, "step000000004")]
    return run / "ckpt"


@pytest.fixture
def two_checkpoints(two_checkpoints_run, tmp_path):
    import shutil

    shutil.copytree(two_checkpoints_run, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:  # one bit, in the middle of the tensors: torch.load would likely not notice
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, name", [("truncated", "mp_rank_00_model_states.pt"), ("bit-flipped", "rank00000.pt")])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path, two_checkpoints, capsys,
                                                                               how, name):
    from tests.helpers import make_trainer, tiny_config

    ckpt = two_checkpoints
    _damage(ckpt / "step000000004" / name, how)
    problems = checkpoint.verify(str(ckpt / "step000000004"))
    assert len(problems) == 1 and problems[0].startswith(name)
    assert ("truncated" if how == "truncated" else "SHA-256 differs") in problems[0]
    capsys.readouterr()
    trainer = make_trainer(tiny_config(tmp_path, "train.epochs=1", "train.stop_at_step=6", "checkpoint.every_steps=2",
                                       "eval.max_eval_images=64"))
    trainer.train()
    out = capsys.readouterr().out
    assert f"checkpoint step000000004 is damaged ({name}:" in out and f"moved to {ckpt}/.damaged/step000000004" in out
    assert f"resumed from {ckpt}/step000000002 at step 2," in out
    assert (ckpt / ".damaged" / "step000000004" / name).is_file()  # kept for inspection, out of resume's way
    assert checkpoint.complete_tags(str(ckpt)) == [(4, "step000000004"), (6, "step000000006")]  # step 4 again, new
    assert checkpoint.verify(str(ckpt / "step000000004")) == [] and (ckpt / "latest").read_text() == "step000000006"


def test_no_intact_checkpoint_is_an_error_naming_every_damaged_file(two_checkpoints):
    ckpt = two_checkpoints
    _damage(ckpt / "step000000004" / "mp_rank_00_model_states.pt", "bit-flipped")
    (ckpt / "step000000002" / "rank00000.pt").unlink()
    with pytest.raises(checkpoint.CheckpointDamaged, match="step000000004: mp_rank_00_model_states.pt: SHA-256.*"
                                                           "step000000002: rank00000.pt: missing.*resume=none"):
        checkpoint.choose(str(ckpt), "auto", rank=0)
    assert checkpoint.complete_tags(str(ckpt)) == [(2, "step000000002"), (4, "step000000004")]  # nothing moved
    with pytest.raises(checkpoint.CheckpointDamaged, match="checkpoint.resume: .*step000000004 is damaged"):
        checkpoint.choose(str(ckpt), "step000000004", rank=0)  # asked for by name: no fallback


def test_a_marker_without_checksums_vouches_for_completeness_only(tmp_path):
    (tmp_path / "step000000001").mkdir()
    (tmp_path / "step000000001" / checkpoint.COMPLETE).write_text('{"step": 1}')  # an older fastclr's marker
    assert checkpoint.verify(str(tmp_path / "step000000001")) == []
    (tmp_path / "step000000002").mkdir()
    (tmp_path / "step000000002" / checkpoint.COMPLETE).write_text('{"step": 2, "fil')  # torn by hand
    assert checkpoint.verify(str(tmp_path / "step000000002"))[0].startswith("COMPLETE: unreadable")


FULL_DISK_RUN = """
import resource, sys
from fastclr.tasks.pretrain import main
limit = int(sys.argv[1])
if limit:  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(sys.argv[2:]))
"""


def _full_disk_run(tmp_path, ckpt, limit, *extra):
    import subprocess
    import sys

    from tests.helpers import TINY, subprocess_env

    args = [*TINY, "train.epochs=1", "checkpoint.every_steps=2", "eval.max_eval_images=64",
            f"logging.dir={tmp_path}/run", f"checkpoint.dir={ckpt}", *extra]
    return subprocess.run([sys.executable, "-c", FULL_DISK_RUN, str(limit), *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def _assert_stopped_with_the_previous_checkpoint_latest(proc, ckpt, errno_text):
    assert proc.returncode == checkpoint.CheckpointWriteError.exit_code, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert "fastclr: error: checkpoint step000000004 could not be written" in err and errno_text in err, err
    assert "the previous checkpoint step000000002 is intact and still the newest" in err
    assert "Traceback" not in err
    assert checkpoint.complete_tags(str(ckpt)) == [(2, "step000000002")]
    assert checkpoint.verify(str(ckpt / "step000000002")) == [] and (ckpt / "latest").read_text() == "step000000002"
    assert not (ckpt / ".partial" / "step000000004").exists()  # the torn files are removed, space given back
    assert checkpoint.resolve(str(ckpt), "auto") == (str(ckpt), "step000000002")


def test_a_full_disk_during_a_checkpoint_stops_the_run_with_the_previous_one_latest(tmp_path):
    """RLIMIT_FSIZE (works without privileges): once the step-2 checkpoint is written, no file may grow past 256 KiB,
    so the step-4 checkpoint's model file (1.5 MB) fails with EFBIG half-way."""
    ckpt = tmp_path / "ckpt"
    first = _full_disk_run(tmp_path, ckpt, 0, "train.stop_at_step=2")
    assert first.returncode == 0, first.stderr[-2000:]
    proc = _full_disk_run(tmp_path, ckpt, 256 << 10, "train.stop_at_step=6")
    _assert_stopped_with_the_previous_checkpoint_latest(proc, ckpt, f"files of at most {256 << 10} bytes")


def test_a_full_filesystem_during_a_checkpoint_stops_the_run_with_the_previous_one_latest(tmp_path):
    """A real ENOSPC: checkpoint.dir on a 2.5 MB tmpfs, where one 1.6 MB checkpoint fits and the second does not."""
    import os
    import subprocess

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(ckpt)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mount.stderr.strip() or 'not root'}); the RLIMIT_FSIZE test "
                    "covers the same path")
    try:
        proc = _full_disk_run(tmp_path, ckpt, 0, "train.stop_at_step=6")
        _assert_stopped_with_the_previous_checkpoint_latest(proc, ckpt, "the disk or a quota is full")
        assert os.statvfs(ckpt).f_bfree * os.statvfs(ckpt).f_frsize > 800_000  # the partial files' space came back
    finally:
        subprocess.run(["umount", "-l", str(ckpt)], capture_output=True)
