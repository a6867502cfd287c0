"""Stopping a run cleanly: signals, the clock, a step limit — agreed by every rank — then requeue and the exit code.

SIGUSR1 (Slurm's warning ahead of the time limit) and SIGTERM (preemption) only record the signal; the training loop
finishes its step, checkpoints and exits with :data:`PREEMPTED_EXIT_CODE` after asking Slurm to requeue the job.
The decision to stop is taken by all ranks together at every step: a signal or a clock reaches each rank at a
different moment, and a rank that left the loop alone would hang the others in the next collective.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 3
"""The trainer's exit status after a signal made it stop with a checkpoint written (the batch script maps it to 0)."""


class StopSignals:
    """Context manager: while inside, SIGUSR1 and SIGTERM set ``received`` instead of ending the process."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class StopPolicy:
    """``reason(step)``: None to go on, else 'stop_at_step', 'signal' or 'deadline' — the same on every rank.

    The flags travel on a CPU (gloo) group even when the data path is NCCL, so the agreement costs no device sync.
    """

    def __init__(self, *, max_minutes: float, stop_at_step: int, world_size: int, cuda: bool):
        self.signals = StopSignals()
        self.max_minutes, self.stop_at_step, self.world_size = max_minutes, stop_at_step, world_size
        self.deadline = math.inf
        self._group = dist.new_group(backend="gloo") if world_size > 1 and cuda else None

    def start_clock(self) -> None:
        self.deadline = time.monotonic() + self.max_minutes * 60 if self.max_minutes else math.inf

    def reason(self, step: int) -> str | None:
        if step == self.stop_at_step:
            return "stop_at_step"
        flags = torch.tensor([float(self.signals.received is not None), float(time.monotonic() > self.deadline)])
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        if flags[0]:
            self.signals.received = self.signals.received or "peer"
            return "signal"
        return "deadline" if flags[1] else None


def exit_code(stop_reason: str | None, is_main: bool) -> int:
    """After a stop on a signal (checkpoint complete on every rank): rank 0 asks Slurm to requeue the job (a no-op
    outside Slurm) and every rank exits with :data:`PREEMPTED_EXIT_CODE`; otherwise 0."""
    if stop_reason != "signal":
        return 0
    if is_main:
        from .slurm import requeue

        requeue()
    return PREEMPTED_EXIT_CODE
