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


class Planner:
    """The trainer's clock for the decision: ``mark(step)`` after every step; True at the decision step."""

    def __init__(self, budget_minutes: float, warmup_steps: int, max_total: int):
        self.budget_s, self.at = budget_minutes * 60.0, decision_step(warmup_steps)
        self.max_total = max_total  # train.epochs of the config: the longest run a budget may choose
        self.t_start = self.t_skip = 0.0
        self.decided = None  # (step, training seconds, evaluation seconds so far) right after the decision
        self.final_eval_s = 0.0
        self.history: list[tuple[int, float]] = []  # (step, training seconds) at the decision and each re-plan

    def start(self, now: float) -> None:
        self.t_start = now

    def replans(self, step: int, steps_per_epoch: int, total: int) -> bool:
        """True at the epoch boundaries after this process's decision, until REPLAN_UNTIL of the run is done."""
        return (self.decided is not None and step > self.decided[0] and step % steps_per_epoch == 0
                and step < REPLAN_UNTIL * total)

    def mark(self, step: int, now: float) -> bool:
        if step == SKIP_STEPS:
            self.t_skip = now
        return step == self.at

    def seconds_per_step(self, now: float) -> float:
        timed = self.at - SKIP_STEPS
        return (now - self.t_skip) / timed if timed > 0 else (now - self.t_start) / max(self.at, 1)


def plan_length(trainer) -> None:
    """After each step of a budgeted run: the decision at its step, then a re-plan at each epoch boundary."""
    import time

    planner, step = trainer.planner, trainer.state.step
    if not trainer.state.total_steps and planner.mark(step, time.monotonic()):
        fit_budget(trainer)
    elif planner.replans(step, trainer.steps_per_epoch, trainer.total_steps):
        replan(trainer)


def fit_budget(trainer) -> None:
    """At the decision step: time one evaluation (also a point of the accuracy curve) and one checkpoint, then set
    the trainer's length (``Trainer.set_length``) and save the chosen epochs in config.yaml."""
    import logging
    import time

    cfg, planner, now = trainer.cfg, trainer.planner, time.monotonic()
    s_per_step = planner.seconds_per_step(now)
    trainer.evaluate("budget")
    t1 = time.monotonic()
    trainer.save(force=True)
    t2 = time.monotonic()
    total = total_steps(
        budget_s=planner.budget_s, elapsed_s=t2 - planner.t_start + (t2 - t1), step=trainer.state.step,
        steps_per_epoch=trainer.steps_per_epoch, costs=Costs(s_per_step, t1 - now, t2 - t1),
        final_evaluations=trainer.stage.final_evaluations, monitor_every_epochs=trainer.stage.monitor_every_epochs,
        checkpoint_every_epochs=cfg.checkpoint.every_epochs, checkpoint_every_steps=cfg.checkpoint.every_steps)
    budget = cfg.train.time_budget_minutes
    _set_unbent_length(trainer, min(agree(total, trainer.rt), planner.max_total), trainer.state.step)
    trainer.save(force=True)  # the same step again, now with the chosen length: a restart keeps it
    planner.final_eval_s = t1 - now
    planner.decided = (trainer.state.step, _training_s(trainer), trainer.eval_s)
    planner.history = [planner.decided[:2]]
    logging.getLogger(__name__).info(
        f"time budget {budget:g} min: {s_per_step * 1e3:.0f} ms/step, evaluation {t1 - now:.1f} s, checkpoint "
        f"{t2 - t1:.1f} s -> {total} steps = {trainer.total_steps / trainer.steps_per_epoch:.2f} epochs")
    _save_config(trainer, budget)


def _set_unbent_length(trainer, total: int, step: int) -> None:
    """The length ``total`` chosen at ``step`` before the cosine began, with the warm-up fitted to it."""
    warmup = trainer.schedule.warmup_steps
    total, short = fit_warmup(total, warmup, step)
    if short != warmup:
        import logging
        logging.getLogger(__name__).warning(
            f"time budget: the warm-up of {warmup} steps (optim.warmup_epochs) does not fit; shortened to {short} "
            f"steps, {WARMUP_MAX_FRACTION:.0%} of the run")
    trainer.set_length(total, warmup_steps=short if short != warmup else 0)


def _save_config(trainer, budget_minutes: float) -> None:
    trainer.save_config(f"The resolved config of this run, its length chosen for a {budget_minutes:g}-min budget")


def agree(total: int, rt) -> int:
    """Rank 0's ``total`` on every rank: clocks differ between ranks, and so would lengths decided from them."""
    import torch
    import torch.distributed as dist

    if rt.world_size == 1 or not dist.is_initialized():
        return total
    t = torch.tensor([total], dtype=torch.int64, device=rt.device)
    dist.broadcast(t, src=0)
    return int(t.item())  # host read: once per decision


def _training_s(trainer) -> float:
    """Seconds of this start that were not evaluations (steps, data, checkpoints)."""
    import time

    return time.monotonic() - trainer.t_start - trainer.eval_s


def replan(trainer) -> None:
    """At an epoch boundary after the decision: the length that fits the budget at the speed measured since the
    decision; if it differs, the rest of the cosine is fitted into it from the next step on."""
    import logging
    import time

    planner, step = trainer.planner, trainer.state.step
    step0, train0, eval0 = planner.decided
    every = trainer.stage.monitor_every_epochs
    span = every * trainer.steps_per_epoch
    monitors = 0 if not every else (step - 1) // span - step0 // span  # done since the decision
    monitor_s = (trainer.eval_s - eval0) / monitors if monitors > 0 else planner.final_eval_s
    pending = monitor_s if every and step % span == 0 else 0.0  # this boundary's monitor runs right after
    # The speed of the more recent half of the steps since the decision: current enough to follow a drift, long
    # enough not to chase one slow epoch.
    now_s = _training_s(trainer)
    planner.history.append((step, now_s))
    mid = step - (step - step0) / 2
    s_from, t_from = min(planner.history, key=lambda h: abs(h[0] - mid))
    if s_from >= step:
        s_from, t_from = step0, train0
    costs = Costs((now_s - t_from) / (step - s_from), planner.final_eval_s, 0.0)
    total = max(step + 1, total_steps(
        budget_s=planner.budget_s, elapsed_s=time.monotonic() - planner.t_start + pending, step=step,
        steps_per_epoch=trainer.steps_per_epoch, costs=costs, final_evaluations=trainer.stage.final_evaluations,
        monitor_every_epochs=every, checkpoint_every_epochs=0, checkpoint_every_steps=0,  # in the measured speed
        monitor_s=monitor_s))
    total = min(agree(total, trainer.rt), planner.max_total)
    if total == trainer.total_steps:
        return
    level = logging.INFO if abs(total - trainer.total_steps) >= 0.01 * trainer.total_steps else logging.DEBUG
    logging.getLogger(__name__).log(level, f"time budget: {costs.seconds_per_step * 1e3:.0f} ms/step recently -> "
                                    f"{total} steps (was {trainer.total_steps})")  # small drifts: not every epoch
    if step < trainer.schedule.warmup_steps:  # still warming up: no cosine to bend yet, only lengths to fit
        _set_unbent_length(trainer, total, step)
    else:
        trainer.set_length(total, step, trainer.schedule.progress(step))
    _save_config(trainer, planner.budget_s / 60)
