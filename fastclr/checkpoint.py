"""Crash-safe checkpoints: DeepSpeed engine state + the run state + per-rank state (loader position, RNG streams).

A checkpoint is written into ``<dir>/.partial/<tag>``, closed with a ``COMPLETE`` marker once every rank has written
its files, and only then renamed to ``<dir>/<tag>`` (an atomic rename on one filesystem). ``latest`` is replaced
atomically afterwards. A kill at any moment — SIGKILL in the middle of a write included — therefore leaves every
``<dir>/<tag>`` complete and ``latest`` pointing at a complete one; a half-written ``.partial`` is ignored and cleared
by the next save. DeepSpeed's own ``save_latest`` writes ``latest`` in place after saving, which a kill can tear:
we never use it.

The marker lists every file of the checkpoint with its size and SHA-256 (1 GB/s on this 2-core CPU, so 0.3 s for a
ResNet-50 checkpoint). Resume checks them: a truncated or bit-flipped file makes the newest checkpoint damaged, it is
moved to ``<dir>/.damaged/`` with a warning naming the file, and the one before it is used.

A write that fails (a full disk: ENOSPC, EFBIG, EDQUOT) is agreed on by every rank, the partial files are removed,
and the run stops with :class:`CheckpointWriteError` (exit 5): the previous checkpoint stays intact and newest. We stop
rather than train on and retry at the next cadence because every step after a failed save is work a crash or a
preemption would lose, beyond the bound ``checkpoint.every_minutes`` promised; and a disk that filled once rarely
empties by itself. The operator frees space and starts the run again; it resumes from that previous checkpoint.
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
import torch.distributed as dist

from . import atomic, integrity
from .config import Config, ConfigError, check_resume_compatible, to_dict
from .runtime import RunFailure

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
LATEST = "latest"
DAMAGED = ".damaged"
_TAG = re.compile(r"^step(\d+)$")


class CheckpointWriteError(RunFailure):
    """A checkpoint could not be written (a full disk); the previous one is intact and still the newest."""

    exit_code = 5


class CheckpointDamaged(RunFailure):
    """The checkpoint to resume from is damaged and there is no intact one to fall back on."""

    exit_code = 2


@dataclass
class RunState:
    """What the training loop carries across steps and across a restart: exactly the checkpoint's run state."""

    step: int = 0
    """Optimizer steps taken."""
    nonfinite_steps: int = 0
    """Steps skipped for non-finite gradients (or fp16 overflow) so far."""
    total_steps: int = 0
    """Steps of the whole schedule when the run chose its length itself (a time budget); 0: the config's."""
    bend_step: int = 0
    """The step from which a time budget's re-planning fitted the rest of the cosine into ``total_steps`` (0: none)."""
    bend_progress: float = 0.0
    """The cosine's progress at ``bend_step`` (:class:`fastclr.optim.Schedule`)."""
    warmup_steps: int = 0
    """Warm-up steps when a time budget too short for the config's warm-up shortened it (0: the config's)."""

    def chose(self, length, warmup_steps: int) -> None:
        """A time budget's length (:class:`fastclr.budget.Length`) and the warm-up it runs with."""
        self.total_steps, self.bend_step, self.bend_progress = length.total, length.bend_step, length.bend_progress
        self.warmup_steps = warmup_steps

    def to_client(self, cfg: Config, world_size: int, steps_per_epoch: int) -> dict:
        """The client state saved with the engine (and, as JSON, in the COMPLETE marker)."""
        return {**asdict(self), "epoch": self.step // steps_per_epoch, "config": to_dict(cfg), "world_size": world_size}

    @classmethod
    def from_client(cls, client: dict) -> "RunState":
        return cls(**{f.name: type(f.default)(client.get(f.name, f.default)) for f in fields(cls)})


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


# --------------------------------------------------------------------------------------------------------------- #
# Files


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        atomic.fsync_dir(dirpath)


def verify(path: str) -> list[str]:
    """What is wrong with the checkpoint folder ``path``, one line per file; empty when every file its marker lists
    is there with its size and checksum. Markers without a list (older checkpoints) vouch for completeness only."""
    try:
        with open(os.path.join(path, COMPLETE)) as f:
            listed = json.load(f).get("files")
    except (OSError, ValueError) as e:
        return [f"{COMPLETE}: unreadable ({e})"]
    return integrity.check(path, listed or {})


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


# --------------------------------------------------------------------------------------------------------------- #
# Agreement between ranks


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(obj) -> list:
    """``obj`` of every rank, in rank order (objects: NCCL groups send them from the current CUDA device)."""
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj):
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _attempt(fn) -> str | None:
    """Run ``fn``; None if it worked, else what went wrong. OSError is the disk; torch's zip writer reports a failed
    write as RuntimeError ("PytorchStreamWriter failed writing file ...")."""
    try:
        fn()
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    except RuntimeError as e:
        # torch's zip writer reports a short write without its errno ("unexpected pos 221056 vs 220952").
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        cap = f"; this process may write files of at most {limit} bytes (ulimit -f)" if limit >= 0 else ""
        return f"RuntimeError: {str(e).strip()[:200]} (a short write: the disk or a quota is full{cap})"


def _write_failed(errors: list, tag: str, ckpt_dir: str) -> CheckpointWriteError:
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    what = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
    prev = complete_tags(ckpt_dir)
    kept = f"the previous checkpoint {prev[-1][1]} is intact and still the newest" if prev else "no earlier checkpoint"
    return CheckpointWriteError(f"checkpoint {tag} could not be written to {ckpt_dir} ({free}): {what}. Nothing of it "
                                f"was kept; {kept}. Free space and start the run again to resume from it")


class _RecordingWrites:
    """DeepSpeed's checkpoint engine with its ``save`` made to record a failure instead of raising: a rank that
    raised would leave DeepSpeed's closing barrier, and its peers would wait there until distributed.timeout."""

    def __init__(self, engine):
        self.ds, self.errors = engine.checkpoint_engine, []

    def __enter__(self):
        inner = self.ds.save

        def save(state_dict, path, *args, **kwargs):
            error = _attempt(lambda: inner(state_dict, path, *args, **kwargs))
            if error:
                self.errors.append(f"{os.path.basename(path)}: {error}")
        self.ds.save = save
        return self

    def __exit__(self, *exc):
        del self.ds.save  # the class's method again


# --------------------------------------------------------------------------------------------------------------- #
# Save


def save(engine, ckpt_dir: str, step: int, client_state: dict, rank_state: dict, rank: int, keep: int) -> str:
    """Collective: every rank calls it. Returns the tag written; raises :class:`CheckpointWriteError` on every rank
    when any rank's write failed, with the partial files removed."""
    tag = tag_for(step)
    partial_root = os.path.join(ckpt_dir, ".partial")
    src = os.path.join(partial_root, tag)

    def agree(error: str | None, all_ranks: bool = True) -> None:
        errors = _gather(error) if all_ranks else [_from_rank0(error)]
        if any(errors):
            if rank == 0:
                shutil.rmtree(src, ignore_errors=True)
            raise _write_failed(errors, tag, ckpt_dir)

    def prepare():
        shutil.rmtree(partial_root, ignore_errors=True)  # torn writes of earlier, killed saves
        os.makedirs(src)

    agree(_attempt(prepare) if rank == 0 else None)
    with _RecordingWrites(engine) as writes:
        error = _attempt(lambda: engine.save_checkpoint(partial_root, tag=tag, client_state=client_state,
                                                        save_latest=False))
    error = error or "; ".join(writes.errors) or _attempt(
        lambda: atomic.torch_save(rank_state, os.path.join(src, f"rank{rank:05d}.pt")))
    agree(error)
    renamed = []

    def seal():
        _fsync_tree(src)
        # The marker carries the client state as JSON (readable by people, and checked against the config before
        # DeepSpeed is asked to load tensors of possibly another shape) and the checksum of every file.
        atomic.write_text(os.path.join(src, COMPLETE), json.dumps({"step": step, **client_state,
                                                                   "files": integrity.manifest(src, COMPLETE)},
                                                                  indent=1))
        dst = os.path.join(ckpt_dir, tag)
        shutil.rmtree(dst, ignore_errors=True)  # a complete copy of the same step: replaced by this one
        os.replace(src, dst)
        renamed.append(dst)
        atomic.fsync_dir(ckpt_dir)
        atomic.write_text(os.path.join(ckpt_dir, LATEST), tag)

    error = _attempt(seal) if rank == 0 else None
    if error and renamed:
        error += f" (after {tag} was complete in place: it is the newest checkpoint, only '{LATEST}' is stale)"
    agree(error, all_ranks=False)
    if rank == 0:
        for _, old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    return tag


# --------------------------------------------------------------------------------------------------------------- #
# Resume


def resolve(ckpt_dir: str, resume: str) -> tuple[str, str] | None:
    """(directory, tag) to resume from, or None. ``resume``: 'auto', 'none', a tag in ``ckpt_dir`` or a path.
    Completeness only; :func:`choose` also checks the files."""
    if resume == "none":
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        return (ckpt_dir, tags[-1][1]) if tags else None
    path = resume if os.path.isdir(resume) else os.path.join(ckpt_dir, resume)
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise FileNotFoundError(f"checkpoint.resume: '{resume}' is not a complete checkpoint (no {COMPLETE} marker "
                                f"in {path})")
    path = os.path.abspath(path)
    return os.path.dirname(path), os.path.basename(path)


def _set_aside(ckpt_dir: str, tag: str) -> str:
    """Move a damaged checkpoint out of the way (kept for inspection), so that neither resume nor pruning sees it."""
    target = os.path.join(ckpt_dir, DAMAGED, tag)
    n = 1
    while os.path.exists(target):
        target, n = os.path.join(ckpt_dir, DAMAGED, f"{tag}.{n}"), n + 1
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(os.path.join(ckpt_dir, tag), target)
    return target


def _choose_on_rank0(ckpt_dir: str, resume: str) -> tuple[str, str] | None:
    where = resolve(ckpt_dir, resume)
    if where is None:
        return None
    if resume != "auto":
        problems = verify(os.path.join(*where))
        if problems:
            raise CheckpointDamaged(f"checkpoint.resume: {os.path.join(*where)} is damaged: {'; '.join(problems)}")
        return where
    damaged = []
    for _, tag in reversed(complete_tags(ckpt_dir)):
        problems = verify(os.path.join(ckpt_dir, tag))
        if not problems:
            for bad, why in damaged:
                moved = _set_aside(ckpt_dir, bad)
                log.warning(f"checkpoint {bad} is damaged ({'; '.join(why)}); moved to {moved}, resuming from {tag}")
            if damaged:
                atomic.write_text(os.path.join(ckpt_dir, LATEST), tag)
            return ckpt_dir, tag
        damaged.append((tag, problems))
    raise CheckpointDamaged(f"every complete checkpoint in {ckpt_dir} is damaged: " + " | ".join(
        f"{tag}: {'; '.join(why)}" for tag, why in damaged) + "; move them away, or set checkpoint.resume=none to "
        "start over")


def choose(ckpt_dir: str, resume: str, rank: int) -> tuple[str, str] | None:
    """Collective: the checkpoint every rank resumes from. Rank 0 verifies the candidates (newest first, for 'auto')
    and the others take its answer, so all load the same one and the files are read once."""
    answer, failure = None, None
    if rank == 0:
        try:
            answer = ("ok", _choose_on_rank0(ckpt_dir, resume))
        except Exception as e:  # every rank must leave with it, or the others wait for rank 0 until the timeout
            answer, failure = ("error", type(e).__name__, str(e)), e
    answer = _from_rank0(answer)
    if answer[0] == "ok":
        return answer[1]
    if failure is not None:
        raise failure
    kind = {"CheckpointDamaged": CheckpointDamaged, "FileNotFoundError": FileNotFoundError}.get(answer[1], RuntimeError)
    raise kind(f"(rank 0) {answer[2]}")


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


def restore(engine, loader, cfg: Config, world_size: int, rank: int, expect: dict | None = None) -> RunState | None:
    """Resume from ``cfg.checkpoint``'s choice, if there is one: engine, loader position, RNG streams. The run
    state of the checkpoint, or None when there is nothing to resume. ``expect``: client-state entries the
    checkpoint must hold as they are (a stage's source: a stage's checkpoints continue only the run they began)."""
    where = choose(cfg.checkpoint.dir, cfg.checkpoint.resume, rank)
    if where is None:
        return None
    meta = read_meta(where)
    check_resume_compatible(meta.get("config", {}), cfg, os.path.join(*where))
    for key, want in (expect or {}).items():
        if meta.get(key, want) != want:
            raise ConfigError(f"config field 'checkpoint.dir': the checkpoint in {os.path.join(*where)} continues a "
                              f"run from {key} {meta[key]!r}, not {want!r}; give another checkpoint.dir (or the "
                              "stage's dir), or checkpoint.resume=none to start over")
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
