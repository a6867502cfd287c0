"""What the console shows while a run trains: a progress bar (or plain periodic lines in a batch log) and the window
of steps since the last log line, whose loss stays on the device until a log step."""
from __future__ import annotations

import sys
import time


class Progress:
    """A tqdm bar on a terminal; plain periodic lines otherwise (logs of batch jobs stay readable)."""

    def __init__(self, total: int, enabled: bool, every_s: float = 15.0):
        self.enabled = enabled
        self.tty = sys.stdout.isatty()
        self.total, self.n = total, 0
        self.every_s, self._last = every_s, 0.0
        self._postfix = ""
        self._bar = None

    def start(self, initial: int) -> None:
        """Begin displaying at step ``initial`` (a resumed run starts part-way)."""
        self.n = initial
        if self.enabled and self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        if not self.enabled:
            return
        self.n += n
        if postfix is not None:
            self._postfix = postfix
        if self._bar is not None:
            self._bar.update(n)
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s or self.n >= self.total:
            self._last = now
            pct = 100.0 * self.n / max(self.total, 1)
            print(f"[{pct:5.1f}%] step {self.n}/{self.total} {self._postfix}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class LogWindow:
    """The steps since the last log line: their summed loss stays a device tensor until ``pop`` (a log step)."""

    def __init__(self, device, step: int = 0):
        import torch

        self.loss_sum = torch.zeros((), device=device)
        self.reset(step)

    def reset(self, step: int) -> None:
        self.loss_sum.zero_()
        self.steps, self.first_step, self.t0 = 0, step, time.monotonic()

    def add(self, loss) -> None:
        self.loss_sum += loss
        self.steps += 1

    def pop(self, step: int, images_per_step: int) -> tuple[float, float]:
        """(mean loss over the window and over every rank, images/s), then a new window from ``step``. Collective
        (every rank logs at the same steps); the host sync of a log step."""
        import torch.distributed as dist

        total = self.loss_sum
        if dist.is_initialized() and dist.get_world_size() > 1:
            total = total.clone()
            dist.all_reduce(total)
            total /= dist.get_world_size()
        mean = (total / max(self.steps, 1)).item()
        ips = (step - self.first_step) * images_per_step / max(time.monotonic() - self.t0, 1e-9)
        self.reset(step)
        return mean, ips
