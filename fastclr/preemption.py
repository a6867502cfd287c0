"""Stopping a run cleanly: signals, the clock, a step limit — agreed by every rank.

SIGUSR1 (Slurm's warning ahead of the time limit) and SIGTERM (preemption) only record the signal; the training loop
finishes its step and checkpoints, and the command exits with :data:`PREEMPTED_EXIT_CODE` after asking Slurm to
requeue the job (``fastclr.tasks.common.exit_status``).
The decision to stop is taken by all ranks together at every step: a signal or a clock reaches each rank at a
different moment, and a rank that left the loop alone would hang the others in the next collective. The same per-step
agreement carries the time-based checkpoint cadence (``checkpoint.every_minutes``).

A peer that dies or hangs makes the survivors' next collective fail (at once for a dead gloo peer, after
``distributed.timeout`` for a hung one); inside the training loop that failure becomes a :class:`PeerFailure` with a
message saying so, and the process exits with :data:`PEER_FAILURE_EXIT_CODE` leaving the checkpoints as they were.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time

import torch
import torch.distributed as dist

from . import runtime

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 3
"""The trainer's exit status after a signal made it stop with a checkpoint written (the batch script maps it to 0)."""
PEER_FAILURE_EXIT_CODE = 4
"""The trainer's exit status after a collective failed because a peer rank died or stopped answering."""

# What gloo (torch 2.13) and NCCL say when the other side of a collective is gone. Measured with 2 gloo ranks in an
# all-reduce loop: SIGKILL of one → "Read error ...: Connection reset by peer" on the other after 12 ms; SIGSTOP →
# "Timed out waiting 10000ms for recv operation to complete" after exactly the 10 s timeout.
_PEER_LOST = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Connection refused",
              "Timed out waiting", "Broken pipe", "NCCL error", "ncclRemoteError", "ProcessGroupNCCL")


class PeerFailure(runtime.RunFailure):
    """A collective failed: some other rank died or stopped answering within ``distributed.timeout``."""

    exit_code = PEER_FAILURE_EXIT_CODE


def is_peer_failure(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a collective that failed on its peers (not a bug of this rank)."""
    if exc is None or isinstance(exc, PeerFailure):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _PEER_LOST)


def peer_failure(exc: BaseException) -> PeerFailure:
    """The :class:`PeerFailure` that explains ``exc`` to the user."""
    rank = f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "this rank"
    limit = runtime.collective_timeout()
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return PeerFailure(
        f"{rank}: a collective failed: a peer rank died or stopped answering "
        f"(distributed.timeout = {limit.total_seconds():g} s): {first}. No checkpoint was written after the failure; "
        "the newest complete one is intact: start the run again (under Slurm: requeue the job) to resume from it"
        if limit else f"{rank}: a collective failed: a peer rank died or stopped answering: {first}")


class StopSignals:
    """Context manager: while inside, SIGUSR1 and SIGTERM set ``received`` instead of ending the process, and a
    collective that fails on its peers leaves as a :class:`PeerFailure`.

    ``python -m fastclr.slurm exec`` blocks SIGUSR1 before it starts the trainer: a blocked signal stays pending
    through ``exec`` (an ignored one would be lost, and Slurm sends its time-limit warning once), so a warning that
    arrives during start-up is delivered here, when the handler is in place.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        self._mask: set | None = None

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            self._mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return self

    def __exit__(self, exc_type, exc, tb):
        # After a stop on a signal the handlers stay: the rank is on its way out through its final checkpoint, which
        # a second SIGTERM (the one Slurm sends every rank when rank 0 requeues, or the time limit's) must not cut
        # short, and its exit status must stay 3 rather than 143.
        if self.received is None:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            if self._mask is not None:
                # Blocked again if they were: a late warning (final evaluation) then waits instead of ending the rank.
                signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        self._previous.clear()
        self._mask = None
        if is_peer_failure(exc):
            raise peer_failure(exc) from exc


class StopPolicy:
    """``vote(step)``: the reason to stop — None to go on, else 'stop_at_step', 'signal' or 'deadline' — the same on
    every rank; it only votes. The same all-reduce carries one more flag for the caller (the checkpoint cadence's
    minutes), so that every rank agrees on it without a second collective.

    The flags travel on a CPU (gloo) group even when the data path is NCCL, so the agreement costs no device sync.
    """

    def __init__(self, *, max_minutes: float, stop_at_step: int, world_size: int, cuda: bool):
        self.signals = StopSignals()
        self.max_minutes, self.stop_at_step, self.world_size = max_minutes, stop_at_step, world_size
        self.deadline = math.inf
        self._group = (dist.new_group(backend="gloo", timeout=runtime.collective_timeout())
                       if world_size > 1 and cuda else None)

    @classmethod
    def of(cls, cfg, rt) -> "StopPolicy":
        """The policy of a run: ``cfg.train``'s limits, ``rt``'s world."""
        return cls(max_minutes=cfg.train.max_minutes, stop_at_step=cfg.train.stop_at_step, world_size=rt.world_size,
                   cuda=rt.cuda)

    def start_clock(self) -> None:
        self.deadline = time.monotonic() + self.max_minutes * 60 if self.max_minutes else math.inf

    def reason(self, step: int) -> str | None:
        return self.vote(step)[0]

    def vote(self, step: int, flag: bool = False) -> tuple[str | None, bool]:
        """(reason to stop, ``flag`` on any rank)."""
        if step == self.stop_at_step:
            return "stop_at_step", False
        now = time.monotonic()
        flags = torch.tensor([float(self.signals.received is not None), float(now > self.deadline), float(flag)])
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        if flags[0]:
            self.signals.received = self.signals.received or "peer"
            return "signal", bool(flags[2])
        if flags[1]:
            return "deadline", bool(flags[2])
        return None, bool(flags[2])
