"""``train.time_budget_minutes``: the length of a run chosen from its own measured speed.

During the warm-up the run measures seconds per step, one evaluation and one checkpoint; then it sets the number of
steps so that the rest of the warm-up, the whole cosine, the monitor evaluations and checkpoints on the way, and the
final evaluation end within the budget. The decision falls inside the warm-up, whose LR does not depend on the
run's length, so the LR of every step is exactly that of a run configured with the chosen epochs from the start (and
a resumed run keeps the chosen length: it is part of the checkpoint's run state).

A machine's speed drifts (other jobs, thermal limits, a shared host): at every epoch boundary after the decision the
run measures its speed since the decision again and, where the length no longer fits the budget, fits the rest of
the same cosine curve into the new length (``Schedule.rescaled``: the LR stays continuous and ends at
``optim.final_lr`` on the last step). The last REPLAN_UNTIL of the run is left as planned. Every rank uses rank 0's
decision (one broadcast per decision), so all ranks take the same number of steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MEASURE_STEPS = 20
"""Steps timed for the speed (after the first two, which pay for allocations and lazy set-up)."""
SKIP_STEPS = 2
REPLAN_UNTIL = 0.95
"""Re-planning stops once this fraction of the run's steps is done."""


WARMUP_MAX_FRACTION = 0.5
"""A budget too short for the config's warm-up shortens it to this fraction of the run (the cosine gets the rest)."""


def fit_warmup(total: int, warmup_steps: int, step: int) -> tuple[int, int]:
    """(total, warm-up) for a run of ``total`` steps decided at ``step``: the config's ``warmup_steps`` where the
    run has room for it, else WARMUP_MAX_FRACTION of the run (never ending before ``step``, which was taken as a
    warm-up step); the total then leaves at least one step of cosine."""
    if warmup_steps < WARMUP_MAX_FRACTION * total:
        return total, warmup_steps
    warmup = max(step, min(warmup_steps, math.floor(WARMUP_MAX_FRACTION * total)))
    return max(total, warmup + 1), warmup


def decision_step(warmup_steps: int) -> int:
    """The step after which the length is decided: as many timed steps as the warm-up allows, up to MEASURE_STEPS."""
    return min(warmup_steps, SKIP_STEPS + MEASURE_STEPS)


@dataclass(frozen=True)
class Costs:
    seconds_per_step: float
    evaluation_s: float
    """One evaluation as the final one runs it (kNN and probe of the trained encoder)."""
    checkpoint_s: float


def total_steps(*, budget_s: float, elapsed_s: float, step: int, steps_per_epoch: int, costs: Costs,
                final_evaluations: int, monitor_every_epochs: int, checkpoint_every_epochs: int,
                checkpoint_every_steps: int, monitor_s: float | None = None) -> int:
    """The run's total steps: the largest T > ``step`` whose remaining steps, monitors, checkpoints and final
    evaluation(s) fit in ``budget_s − elapsed_s`` (at least one more step). ``monitor_s``: one monitor evaluation
    (kNN only) where measured; else ``costs.evaluation_s``."""
    monitor_s = costs.evaluation_s if monitor_s is None else monitor_s
    left = budget_s - elapsed_s - final_evaluations * costs.evaluation_s - costs.checkpoint_s  # the final save

    def extra_s(total: int) -> float:
        """Evaluations and checkpoints the cadences add between ``step`` and ``total``."""
        def between(every_steps: int) -> int:
            return 0 if every_steps <= 0 else max(0, (total - 1) // every_steps - step // every_steps)
        monitors = between(monitor_every_epochs * steps_per_epoch)
        saves = between(checkpoint_every_epochs * steps_per_epoch) + between(checkpoint_every_steps)
        return monitors * monitor_s + saves * costs.checkpoint_s

    def fits(total: int) -> bool:
        return (total - step) * costs.seconds_per_step + extra_s(total) <= left

    lo, hi = step + 1, step + max(1, math.floor(left / costs.seconds_per_step))  # cost grows with the length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


@dataclass(frozen=True)
class Length:
    """A time budget's decision, applied by the trainer (``Trainer.apply_length``) and kept in the run state: the run's
    total steps, the cosine bent at ``bend_step`` with its progress there (0: not bent), a shortened warm-up (0: the
    config's)."""

    total: int
    bend_step: int = 0
    bend_progress: float = 0.0
    warmup_steps: int = 0


@dataclass(frozen=True)
class RunCosts:
    """What the run adds to its steps, from its config: evaluations and checkpoints at their cadences."""

    steps_per_epoch: int
    final_evaluations: int
    monitor_every_epochs: int
    checkpoint_every_epochs: int
    checkpoint_every_steps: int


class Planner:
    """The length of a budgeted run. The trainer asks :meth:`due` after every step; at 'decide' it times one
    evaluation and one checkpoint and calls :meth:`decide`, at 'replan' it calls :meth:`replan`; both return a
    :class:`Length` (None: keep the length) and touch nothing of the trainer. ``agree(total)``: rank 0's ``total``
    on every rank."""

    def __init__(self, budget_minutes: float, warmup_steps: int, max_total: int, run: RunCosts,
                 agree=lambda total: total):
        self.budget_s, self.at = budget_minutes * 60.0, decision_step(warmup_steps)
        self.max_total = max_total  # the configured epochs: the longest run a budget may choose
        self.run, self.agree = run, agree
        self.t_start = self.t_skip = 0.0
        self.decided = None  # (step, training seconds, evaluation seconds so far) right after the decision
        self.final_eval_s = 0.0
        self.history: list[tuple[int, float]] = []  # (step, training seconds) at the decision and each re-plan

    @classmethod
    def of(cls, cfg, rt, stage, schedule, steps_per_epoch: int) -> "Planner | None":
        """The planner of a run with ``train.time_budget_minutes`` (None without one); ``stage``'s evaluations."""
        if not cfg.train.time_budget_minutes:
            return None
        run = RunCosts(steps_per_epoch, stage.final_evaluations, stage.monitor_every_epochs,
                       cfg.checkpoint.every_epochs, cfg.checkpoint.every_steps)
        return cls(cfg.train.time_budget_minutes, schedule.warmup_steps, schedule.total_steps, run,
                   lambda total: agree(total, rt))

    def start(self, now: float) -> None:
        self.t_start = now

    def due(self, step: int, now: float, length_chosen: bool, total: int) -> str | None:
        """'decide' at the decision step of a run whose length is not chosen yet; 'replan' at the epoch boundaries
        after this process's decision, until REPLAN_UNTIL of the run is done; else None."""
        if step == SKIP_STEPS:
            self.t_skip = now
        if not length_chosen:
            return "decide" if step == self.at else None
        if (self.decided is not None and step > self.decided[0] and step % self.run.steps_per_epoch == 0
                and step < REPLAN_UNTIL * total):
            return "replan"
        return None

    def seconds_per_step(self, now: float) -> float:
        timed = self.at - SKIP_STEPS
        return (now - self.t_skip) / timed if timed > 0 else (now - self.t_start) / max(self.at, 1)

    def decide(self, step: int, now: float, evaluation_s: float, checkpoint_s: float, warmup_steps: int) -> Length:
        """At the decision step (``now``: before the timed evaluation and checkpoint, which took ``evaluation_s``
        and ``checkpoint_s``): the length that fits the budget, its warm-up fitted to it."""
        import logging

        r, s_per_step = self.run, self.seconds_per_step(now)
        after = now + evaluation_s + checkpoint_s
        total = total_steps(
            budget_s=self.budget_s, elapsed_s=after - self.t_start + checkpoint_s, step=step,
            steps_per_epoch=r.steps_per_epoch, costs=Costs(s_per_step, evaluation_s, checkpoint_s),
            final_evaluations=r.final_evaluations, monitor_every_epochs=r.monitor_every_epochs,
            checkpoint_every_epochs=r.checkpoint_every_epochs, checkpoint_every_steps=r.checkpoint_every_steps)
        length = self._unbent(min(self.agree(total), self.max_total), warmup_steps, step)
        self.final_eval_s = evaluation_s
        logging.getLogger(__name__).info(
            f"time budget {self.budget_s / 60:g} min: {s_per_step * 1e3:.0f} ms/step, evaluation {evaluation_s:.1f} s, "
            f"checkpoint {checkpoint_s:.1f} s -> {total} steps = {length.total / r.steps_per_epoch:.2f} epochs")
        return length

    def decided_at(self, step: int, training_s: float, eval_s: float) -> None:
        """The decision is applied and saved: this start's seconds outside and inside evaluations so far, from
        which re-plans measure the speed."""
        self.decided = (step, training_s, eval_s)
        self.history = [self.decided[:2]]

    def _unbent(self, total: int, warmup: int, step: int) -> Length:
        """The length ``total`` chosen at ``step`` before the cosine began, with the warm-up fitted to it."""
        total, short = fit_warmup(total, warmup, step)
        if short != warmup:
            import logging
            logging.getLogger(__name__).warning(
                f"time budget: the warm-up of {warmup} steps (optim.warmup_epochs) does not fit; shortened to {short} "
                f"steps, {WARMUP_MAX_FRACTION:.0%} of the run")
        return Length(total, warmup_steps=short if short != warmup else 0)

    def replan(self, step: int, now: float, training_s: float, eval_s: float, total: int, warmup_steps: int,
               progress: float) -> Length | None:
        """At an epoch boundary after the decision: the length that fits the budget at the speed measured since the
        decision; None if it is ``total`` still, else the rest of the cosine fitted into it from the next step on
        (``progress``: the cosine's at ``step``)."""
        import logging

        r, (step0, train0, eval0) = self.run, self.decided
        every = r.monitor_every_epochs
        span = every * r.steps_per_epoch
        monitors = 0 if not every else (step - 1) // span - step0 // span  # done since the decision
        monitor_s = (eval_s - eval0) / monitors if monitors > 0 else self.final_eval_s
        pending = monitor_s if every and step % span == 0 else 0.0  # this boundary's monitor runs right after
        # The speed of the more recent half of the steps since the decision: current enough to follow a drift, long
        # enough not to chase one slow epoch.
        self.history.append((step, training_s))
        mid = step - (step - step0) / 2
        s_from, t_from = min(self.history, key=lambda h: abs(h[0] - mid))
        if s_from >= step:
            s_from, t_from = step0, train0
        costs = Costs((training_s - t_from) / (step - s_from), self.final_eval_s, 0.0)
        new = max(step + 1, total_steps(
            budget_s=self.budget_s, elapsed_s=now - self.t_start + pending, step=step,
            steps_per_epoch=r.steps_per_epoch, costs=costs, final_evaluations=r.final_evaluations,
            monitor_every_epochs=every, checkpoint_every_epochs=0, checkpoint_every_steps=0,  # in the measured speed
            monitor_s=monitor_s))
        new = min(self.agree(new), self.max_total)
        if new == total:
            return None
        level = logging.INFO if abs(new - total) >= 0.01 * total else logging.DEBUG
        logging.getLogger(__name__).log(level, f"time budget: {costs.seconds_per_step * 1e3:.0f} ms/step recently -> "
                                        f"{new} steps (was {total})")  # small drifts: not every epoch
        if step < warmup_steps:  # still warming up: no cosine to bend yet, only lengths to fit
            return self._unbent(new, warmup_steps, step)
        return Length(new, step, progress)


def agree(total: int, rt) -> int:
    """Rank 0's ``total`` on every rank: clocks differ between ranks, and so would lengths decided from them."""
    import torch
    import torch.distributed as dist

    if rt.world_size == 1 or not dist.is_initialized():
        return total
    t = torch.tensor([total], dtype=torch.int64, device=rt.device)
    dist.broadcast(t, src=0)
    return int(t.item())  # host read: once per decision
