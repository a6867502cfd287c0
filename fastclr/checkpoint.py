"""Crash-safe checkpoints: DeepSpeed engine state + the run state + per-rank state (loader position, RNG streams).

A checkpoint is written into ``<dir>/.partial/<tag>``, closed with a ``COMPLETE`` marker once every rank has written
its files, and only then renamed to ``<dir>/<tag>`` (an atomic rename on one filesystem). ``latest`` is replaced
atomically afterwards. A kill at any moment — SIGKILL in the middle of a write included — therefore leaves every
``<dir>/<tag>`` complete and ``latest`` pointing at a complete one; a half-written ``.partial`` is ignored and cleared
by the next save. DeepSpeed's own ``save_latest`` writes ``latest`` in place after saving, which a kill can tear:
we never use it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from . import atomic
from .config import Config, check_resume_compatible, to_dict
from .runtime import barrier

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step(\d+)$")


@dataclass
class RunState:
    """What the training loop carries across steps and across a restart: exactly the checkpoint's run state."""

    step: int = 0
    """Optimizer steps taken."""
    nonfinite_steps: int = 0
    """Steps skipped for non-finite gradients (or fp16 overflow) so far."""

    def to_client(self, cfg: Config, world_size: int, steps_per_epoch: int) -> dict:
        """The client state saved with the engine (and, as JSON, in the COMPLETE marker)."""
        return {**asdict(self), "epoch": self.step // steps_per_epoch, "config": to_dict(cfg), "world_size": world_size}

    @classmethod
    def from_client(cls, client: dict) -> "RunState":
        return cls(**{f.name: int(client.get(f.name, 0)) for f in fields(cls)})


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        atomic.fsync_dir(dirpath)


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
    atomic.torch_save(rank_state, os.path.join(partial_root, tag, f"rank{rank:05d}.pt"))
    barrier()
    if rank == 0:
        src = os.path.join(partial_root, tag)
        _fsync_tree(src)
        # The marker carries the client state as JSON: readable by people, and checked against the config before
        # DeepSpeed is asked to load tensors of possibly another shape.
        atomic.write_text(os.path.join(src, COMPLETE), json.dumps({"step": step, **client_state}, indent=1))
        dst = os.path.join(ckpt_dir, tag)
        shutil.rmtree(dst, ignore_errors=True)  # a complete copy of the same step: replaced by this one
        os.replace(src, dst)
        atomic.fsync_dir(ckpt_dir)
        atomic.write_text(os.path.join(ckpt_dir, LATEST), tag)
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
    # Our own file, written next to the engine state by this rank: it holds numpy RNG state, which weights_only
    # refuses; a checkpoint folder is trusted like the code that resumes from it.
    rank_state = torch.load(rank_file, weights_only=False) if os.path.isfile(rank_file) else {}
    return client_state or {}, rank_state


def restore(engine, loader, cfg: Config, world_size: int, rank: int) -> RunState | None:
    """Resume from ``cfg.checkpoint``'s choice, if there is one: engine, loader position, RNG streams. The run
    state of the checkpoint, or None when there is nothing to resume."""
    where = resolve(cfg.checkpoint.dir, cfg.checkpoint.resume)
    if where is None:
        return None
    check_resume_compatible(read_meta(where).get("config", {}), cfg, os.path.join(*where))
    client, rank_state = load(engine, where, rank)
    state = RunState.from_client(client)
    saved_world = client.get("world_size", world_size)
    if saved_world != world_size and rank == 0:
        log.info(f"resuming a {saved_world}-rank checkpoint on {world_size} ranks: the data order of the current "
                 "epoch changes")
    if rank_state.get("loader") and saved_world == world_size:
        loader.load_state_dict(rank_state["loader"])
    else:
        loader.set_epoch(int(client.get("epoch", 0)))
    set_rng_state(rank_state.get("rng", {}))
    log.info(f"resumed from {os.path.join(*where)} at step {state.step}, epoch {client.get('epoch', 0)}")
    return state
