"""What a micro-batch is scored by: NT-Xent (Chen et al. 2020, eq. 1) of the two views' projections against every
rank's embeddings (the cross-replica negatives of the reference implementation), and with SimCLR v2's memory also
against the queue of momentum-encoder keys, which this batch's keys then join."""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import losses
from .models.momentum import momentum_at


class Objective:
    def __init__(self, cfg, engine, world_size: int, autocast_dtype):
        self.cfg, self.engine, self.world_size, self.dtype = cfg, engine, world_size, autocast_dtype
        self.group = "world" if (cfg.loss.global_negatives and world_size > 1) else None
        self.memory = getattr(engine.module, "memory", None)
        self.pushed = 0  # keys in the FIFO so far, over all ranks: its position and fill, derived, never read back
        self._pending: list[torch.Tensor] = []  # this step's keys: they join the queue after its backward

    def __call__(self, view_a: torch.Tensor, view_b: torch.Tensor, timer) -> torch.Tensor:
        cfg = self.cfg
        with timer.phase("forward"):
            x = torch.cat([view_a, view_b])  # (2B, 3, H, W), channels_last kept by cat
            z = self.engine(x)  # (2B, d); the engine autocasts
            queue = keys = None
            if self.memory is not None:
                with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                    keys = self._gathered(self.memory.keys(x))  # (W·2B, d), [every a; every b] like the columns
                queue = self.memory.negatives(self.pushed)
        with timer.phase("loss"):
            z_a, z_b = z.chunk(2)
            loss = losses.nt_xent(z_a, z_b, temperature=cfg.loss.temperature, impl=cfg.loss.impl, group=self.group,
                                  queue=queue)
        if keys is not None:
            self._pending.append(keys)
        return loss

    def _gathered(self, keys: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return keys
        w, n2, d = self.world_size, keys.shape[0], keys.shape[1]
        every = keys.new_empty(w * n2, d)
        dist.all_gather_into_tensor(every, keys.contiguous())
        return every.view(w, 2, n2 // 2, d).transpose(0, 1).reshape(w * n2, d)

    def end_step(self, step: int, total_steps: int) -> None:
        """After the optimizer step ``step`` (0-based): the step's keys join the queue (not earlier: the loss keeps
        the queue it used for its backward), and the momentum encoder follows the online network."""
        if self.memory is not None:
            for keys in self._pending:
                self.pushed = self.memory.push(keys, self.pushed)
            self._pending.clear()
            online = [p for name, p in self.engine.module.named_parameters() if not name.startswith("memory.")]
            self.memory.update(online, momentum_at(step, total_steps, self.cfg.model.momentum))

    def resume(self, step: int, plan) -> None:
        """The queue's position after ``step`` steps of the batch ``plan``: every rank's keys, or this rank's."""
        per_step = plan.global_batch if self.group else plan.micro_batch * plan.accumulation
        self.pushed = step * 2 * per_step
