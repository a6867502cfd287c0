"""SimCLR v2's memory (Chen et al. 2020b, sec. 2; after MoCo, He et al. 2020): a momentum encoder — an exponential
moving average of the online encoder and head — whose embeddings of recent batches wait in a FIFO queue and serve
every anchor as extra negatives.

Part of the model (``SimCLRModel.memory``): its weights and queue are buffers and frozen parameters of the module,
so DeepSpeed broadcasts, checkpoints and restores them with the rest, and exact resume holds. Where the queue's
write position and fill stand is not stored at all: both follow from the number of keys pushed so far, which the
trainer derives from the step, so no value is read back from the device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """EMA momentum of step ``step``: ``base`` at the start, rising to 1 along a half cosine over the run (BYOL's
    schedule, Grill et al. 2020): m = 1 − (1 − base)·(cos(π·step/total) + 1)/2."""
    if not 0 <= base < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {base}")
    progress = min(step, total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class MomentumMemory(nn.Module):
    """``network``: the EMA copy (same architecture, its own BN statistics); ``queue``: (size, dim) fp32 keys."""

    def __init__(self, online: nn.Module, copy: nn.Module, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"memory size must be >= 1, got {size}")
        copy.load_state_dict(online.state_dict())
        self.network = copy.requires_grad_(False)
        self.register_buffer("queue", torch.zeros(size, dim))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @torch.no_grad()
    def update(self, online: list[torch.Tensor], momentum: float) -> None:
        """ξ ← m·ξ + (1 − m)·θ for every parameter, one multi-tensor call (``momentum`` is a host float: no sync)."""
        torch._foreach_lerp_(list(self.network.parameters()), online, 1.0 - momentum)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalized fp32 embeddings of the momentum network (no gradient), (B, dim)."""
        return F.normalize(self.network(x).float(), dim=1)

    def negatives(self, pushed: int) -> torch.Tensor | None:
        """The keys in the queue after ``pushed`` keys went in (all of it once full), or None while empty."""
        filled = min(pushed, self.size)
        return self.queue[:filled] if filled else None

    @torch.no_grad()
    def push(self, keys: torch.Tensor, pushed: int) -> int:
        """Write ``keys`` (K, dim) over the oldest entries (FIFO, wrapping); returns the new count of keys pushed."""
        k = keys.shape[0]
        if k >= self.size:  # more keys than room: only the newest fit
            keys, pushed, k = keys[-self.size:], pushed + k - self.size, self.size
        index = (torch.arange(k, device=self.queue.device) + pushed % self.size) % self.size
        self.queue.index_copy_(0, index, keys.to(self.queue.dtype))
        return pushed + k
