"""Crash-safe checkpoints: DeepSpeed engine state + client state + per-rank state.

A checkpoint is written into ``<dir>/.partial/<tag>``, closed with a ``COMPLETE`` marker once every rank has written
its files, and only then renamed to ``<dir>/<tag>`` (an atomic rename on one filesystem). ``latest`` is replaced
atomically afterwards. A kill at any moment — SIGKILL in the middle of a write included — therefore leaves every
``<dir>/<tag>`` complete and ``latest`` pointing at a complete one; a half-written ``.partial`` is ignored and cleared
by the next save. DeepSpeed's own ``save_latest`` writes ``latest`` in place after saving, which a kill can tear:
we never use it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch

from .runtime import barrier

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a file so that readers see the old content or the new one, never a torn mix."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes files owner-only; checkpoints and exports are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(d)  # persist the rename itself: without it a power loss can bring the old file back


def atomic_torch_save(obj, path: str) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def complete_tags(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _TAG.match(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, COMPLETE)):
            found.append((int(m.group(1)), name))
    return sorted(found)


def save(engine, ckpt_dir: str, step: int, client_state: dict, rank_state: dict, rank: int, keep: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(step)
    partial_root = os.path.join(ckpt_dir, ".partial")
    if rank == 0:
        shutil.rmtree(partial_root, ignore_errors=True)  # torn writes of earlier, killed saves
        os.makedirs(partial_root, exist_ok=True)
    barrier()
    engine.save_checkpoint(partial_root, tag=tag, client_state=client_state, save_latest=False)
    atomic_torch_save(rank_state, os.path.join(partial_root, tag, f"rank{rank:05d}.pt"))
    barrier()
    if rank == 0:
        src = os.path.join(partial_root, tag)
        _fsync_tree(src)
        # The marker carries the client state as JSON: readable by people, and checked against the config before
        # DeepSpeed is asked to load tensors of possibly another shape.
        atomic_write_bytes(os.path.join(src, COMPLETE), json.dumps({"step": step, **client_state}, indent=1).encode())
        dst = os.path.join(ckpt_dir, tag)
        shutil.rmtree(dst, ignore_errors=True)  # a complete copy of the same step: replaced by this one
        os.replace(src, dst)
        _fsync_dir(ckpt_dir)
        atomic_write_bytes(os.path.join(ckpt_dir, LATEST), tag.encode())
        for _, old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    barrier()
    return tag


def resolve(ckpt_dir: str, resume: str) -> tuple[str, str] | None:
    """(directory, tag) to resume from, or None. ``resume``: 'auto', 'none', a tag in ``ckpt_dir`` or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        return (ckpt_dir, tags[-1][1]) if tags else None
    path = resume if os.path.isdir(resume) else os.path.join(ckpt_dir, resume)
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise FileNotFoundError(f"checkpoint.resume: '{resume}' is not a complete checkpoint (no {COMPLETE} marker in {path})")
    path = os.path.abspath(path)
    return os.path.dirname(path), os.path.basename(path)


def read_meta(where: tuple[str, str]) -> dict:
    with open(os.path.join(*where, COMPLETE)) as f:
        return json.load(f)


def load(engine, where: tuple[str, str], rank: int) -> tuple[dict, dict]:
    """Restore the engine; return (client_state, this rank's state)."""
    directory, tag = where
    path, client_state = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(directory, tag)}")
    rank_file = os.path.join(directory, tag, f"rank{rank:05d}.pt")
    rank_state = torch.load(rank_file, weights_only=False) if os.path.isfile(rank_file) else {}
    return client_state or {}, rank_state
