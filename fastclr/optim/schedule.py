"""Learning rate as a pure function of the step: batch-size scaling, linear warmup, cosine decay.

SimCLR (Chen et al. 2020) scales the LR with the batch size, warms it up linearly for 10 epochs (warmup for large
batches: Goyal et al. 2017) and then decays it with a cosine schedule without restarts (Loshchilov & Hutter 2017).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

from ..config import LrScaling, choices

RULES = tuple(r for r in choices(LrScaling) if r != "none")
"""The batch-size scaling rules; ``none`` (the config's third choice) takes the base LR as is."""


def scaled_lr(base_lr: float, batch_size: int, rule: str) -> float:
    """Peak LR for a global batch: ``linear`` base·B/256 (SimCLR: base 0.3), ``sqrt`` base·√B (SimCLR: base 0.075,
    which the paper found better for smaller batches). At B = 4096 both SimCLR bases give 4.8."""
    if rule not in RULES:
        raise ValueError(f"unknown LR scaling rule {rule!r}; choose one of {RULES}")
    if not (isinstance(batch_size, Integral) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not base_lr >= 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}")
    return base_lr * batch_size / 256 if rule == "linear" else base_lr * math.sqrt(batch_size)


def lr_at(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0) -> float:
    """LR of optimizer step ``step`` (0-based).

    Warmup: peak·(step+1)/warmup for step < warmup, so the first step already moves and step warmup−1 is at peak.
    Then a half cosine from peak (held at step warmup−1, or at step 0 without warmup) down to ``final_lr`` at step
    total_steps−1; later steps stay at ``final_lr``. A 1-step schedule runs at peak.
    """
    if not (isinstance(total_steps, Integral) and total_steps >= 1):
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not (isinstance(warmup_steps, Integral) and 0 <= warmup_steps < total_steps):
        raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}), got {warmup_steps!r}")
    if not (isinstance(step, Integral) and step >= 0):
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not 0 <= final_lr <= peak_lr:
        raise ValueError(f"need 0 <= final_lr <= peak_lr, got final_lr={final_lr}, peak_lr={peak_lr}")
    if step < warmup_steps:
        return peak_lr * ((step + 1) / warmup_steps)  # exactly peak_lr at step warmup−1
    start = max(warmup_steps - 1, 0)  # the step at peak where the decay begins
    span = total_steps - 1 - start
    if span == 0:
        return peak_lr
    progress = min(step - start, span) / span  # in [0, 1]
    return final_lr + 0.5 * (peak_lr - final_lr) * (1 + math.cos(math.pi * progress))


def peak_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """The peak LR of a run: ``scaled_lr`` for ``linear``/``sqrt``, the base LR itself for ``none``."""
    return base_lr if rule == "none" else scaled_lr(base_lr, global_batch, rule)


def cosine_progress(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Where ``step`` lies on :func:`lr_at`'s cosine: 0 at its peak (and during warm-up), 1 from its last step on."""
    start = max(warmup_steps - 1, 0)
    span = total_steps - 1 - start
    return 1.0 if span <= 0 else min(max(step - start, 0), span) / span


@dataclass(frozen=True)
class Schedule:
    """A run's LR schedule: ``schedule(step)`` is :func:`lr_at` with the run's lengths and rates.

    ``rescaled(step, total)`` keeps the steps up to ``step`` and fits the rest of the same cosine curve into the new
    length (a time budget re-planning with the speed it measured): the LR stays continuous and the curve still ends at
    ``final_lr`` on the last step. After such a change (``bend_step`` > 0) the cosine's progress runs linearly from
    ``bend_progress`` at ``bend_step`` to 1 at ``total_steps − 1``."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    final_lr: float
    bend_step: int = 0
    bend_progress: float = 0.0

    @classmethod
    def of(cls, cfg, steps_per_epoch: int, global_batch: int) -> "Schedule":
        """Pretraining's, from a :class:`fastclr.config.Config` (``train.epochs`` and the ``optim`` section)."""
        return cls.in_epochs(cfg.train.epochs, cfg.optim.warmup_epochs, cfg.optim.base_lr, cfg.optim.lr_scaling,
                             cfg.optim.final_lr, steps_per_epoch, global_batch)

    @classmethod
    def in_epochs(cls, epochs: float, warmup_epochs: float, base_lr: float, lr_scaling: str, final_lr: float,
                  steps_per_epoch: int, global_batch: int) -> "Schedule":
        """Lengths in epochs turned into steps of ``steps_per_epoch``; the peak LR scaled for ``global_batch``."""
        total = max(1, round(epochs * steps_per_epoch))
        return cls(total_steps=total, warmup_steps=min(total - 1, round(warmup_epochs * steps_per_epoch)),
                   peak_lr=peak_lr(base_lr, global_batch, lr_scaling), final_lr=final_lr)

    def progress(self, step: int) -> float:
        """The cosine's progress at ``step``: 0 at the peak, 1 from the last step on. Before ``bend_step`` it is
        interpolated between the peak and the bend (exactly the earlier curve after one rescale)."""
        if self.bend_step <= 0:
            return cosine_progress(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps)
        if step < self.bend_step:
            start = max(self.warmup_steps - 1, 0)
            return self.bend_progress * max(step - start, 0) / max(self.bend_step - start, 1)
        span = self.total_steps - 1 - self.bend_step
        done = 1.0 if span <= 0 else min(step - self.bend_step, span) / span
        return self.bend_progress + (1.0 - self.bend_progress) * done

    def __call__(self, step: int) -> float:
        if self.bend_step <= 0 or step < self.warmup_steps:
            return lr_at(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, peak_lr=self.peak_lr,
                         final_lr=self.final_lr)
        return self.final_lr + 0.5 * (self.peak_lr - self.final_lr) * (1 + math.cos(math.pi * self.progress(step)))

    def rescaled(self, step: int, total_steps: int) -> "Schedule":
        """Steps before ``step`` as they were; from ``step`` on, the rest of the cosine over ``total_steps``."""
        if not (step >= self.warmup_steps and total_steps > step):
            raise ValueError(f"a schedule can be rescaled after its warm-up ({self.warmup_steps} steps) to a length "
                             f"beyond the step ({step}), got step {step} and {total_steps} steps")
        return Schedule(total_steps, self.warmup_steps, self.peak_lr, self.final_lr, step, self.progress(step))
