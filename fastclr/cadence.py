"""When a run writes a checkpoint on its own cadence: every ``checkpoint.every_steps`` steps and at the end of every
``checkpoint.every_epochs``-th epoch (the final save after the last step is the loop's, always). The minutes bound
(``checkpoint.every_minutes``) needs every rank's clock, so it is voted with the stop flags
(:class:`fastclr.preemption.StopPolicy`), and a save inside a non-finite streak is refused by the trainer."""
from __future__ import annotations


class Cadence:
    def __init__(self, section, steps_per_epoch: int):
        self.every_steps, self.every_epochs, self.steps_per_epoch = (section.every_steps, section.every_epochs,
                                                                     steps_per_epoch)

    def due(self, step: int, last: bool) -> bool:
        """After optimizer step ``step`` (1-based count of steps taken); ``last``: the run's final step."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        epoch, boundary = divmod(step, self.steps_per_epoch)
        return not last and boundary == 0 and bool(self.every_epochs) and epoch % self.every_epochs == 0
