"""Where a training step's time goes: wall time per phase (data, forward, loss, backward, wait, comm, optimizer),
accumulated between log steps and logged as ``t_<phase>_ms`` (``logging.timers``)."""
from __future__ import annotations

import contextlib
import time


class PhaseTimer:
    """Wall time per named phase of the training step, accumulated between log steps.

    Disabled, ``phase()`` is a no-op context. Enabled on CUDA, each phase boundary synchronizes the device so that the
    time lands in the phase that spent it (asynchronous launches would otherwise bill everything to the first sync).
    """

    PHASES = ("data", "forward", "loss", "backward", "wait", "comm", "optimizer")

    def __init__(self, enabled: bool, device):
        self.enabled = enabled
        self._sync = device.type == "cuda"
        self.totals = dict.fromkeys(self.PHASES, 0.0)

    def _now(self) -> float:
        if self._sync:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        t0 = self._now()
        try:
            yield
        finally:
            self.totals[name] += self._now() - t0

    def pop_ms_per_step(self, steps: int) -> dict:
        """{'t_<phase>_ms': mean ms per optimizer step since the last call}; empty when disabled."""
        if not self.enabled or steps <= 0:
            return {}
        out = {f"t_{k}_ms": 1000.0 * v / steps for k, v in self.totals.items()}
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        return out
