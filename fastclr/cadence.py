"""When a run writes a checkpoint — the one place that decides it: every ``checkpoint.every_steps`` steps, at the end
of every ``checkpoint.every_epochs``-th epoch, once ``checkpoint.every_minutes`` have passed since the last
checkpoint of any cadence (every rank's clock agreed through the stop vote, :meth:`fastclr.preemption.StopPolicy.vote`),
never inside a streak of non-finite steps (their batches also went through BN's statistics: the previous checkpoint
stays newest until a good step), and always after the last step and on a stop (the loop's final save)."""
from __future__ import annotations

import time


class Cadence:
    def __init__(self, section, steps_per_epoch: int):
        self.every_steps, self.every_epochs, self.steps_per_epoch = (section.every_steps, section.every_epochs,
                                                                     steps_per_epoch)
        self.every_s = section.every_minutes * 60
        self._saved_at = time.monotonic()

    def start_clock(self) -> None:
        """The minutes count from the start of training (not of the process: imports and resume are not work)."""
        self._saved_at = time.monotonic()

    def saved(self) -> None:
        """A checkpoint was just written (at any cadence): the minutes clock starts again."""
        self._saved_at = time.monotonic()

    def minutes_up(self) -> bool:
        """This rank's clock says ``every_minutes`` have passed (the trainer puts it to the vote)."""
        return self.every_s > 0 and time.monotonic() - self._saved_at >= self.every_s

    def due(self, step: int, last: bool, minutes_agreed: bool = False) -> bool:
        """After optimizer step ``step`` (1-based count of steps taken); ``last``: the run's final step, whose save
        is the loop's own; ``minutes_agreed``: the vote found the minutes up on some rank."""
        if minutes_agreed or (self.every_steps and step % self.every_steps == 0):
            return True
        epoch, boundary = divmod(step, self.steps_per_epoch)
        return not last and boundary == 0 and bool(self.every_epochs) and epoch % self.every_epochs == 0

    @staticmethod
    def allows(periodic: bool, nonfinite_streak: int) -> bool:
        """A cadence's save is skipped inside a non-finite streak (due again at the next step); a forced or final
        save is not."""
        return not (periodic and nonfinite_streak)
