"""The train-step baseline: a plain PyTorch SimCLR step, as the popular public SimCLR repositories write it.

fp32, NCHW, the NT-Xent loss as a masked (2N × 2N) cross-entropy, and LARS as a Python loop over parameters (two
norms, a trust ratio and a momentum update per tensor; biases and BN parameters skip weight decay and adaptation).
The network is the same ResNet + projection head fastclr trains, so the comparison isolates the step's technique.
Written for the benchmark; training never uses it. ``Step`` switches fastclr's techniques on one at a time for the
ablation: channels_last, bf16 autocast, the tiled NT-Xent, the multi-tensor LARS.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def plain_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean NT-Xent over the 2N anchors: cosine logits of every pair, self-pairs masked, cross-entropy on the
    positive's index."""
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


class PlainLARS(torch.optim.Optimizer):
    """LARS with momentum, one parameter at a time (You et al. 2017; SimCLR's variant excludes 1-D parameters)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if p.ndim > 1:  # conv and linear weights: decay and layer-wise adaptation
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(d_p)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    d_p = d_p.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d_p).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


TECHNIQUES = ("channels_last", "bf16", "tiled_loss", "multi_tensor_lars")


class Step:
    """One SimCLR step on fixed views: the plain baseline with any of ``TECHNIQUES`` switched on."""

    def __init__(self, model: torch.nn.Module, *, temperature: float = 0.5, lr: float = 0.3, on: tuple = ()):
        unknown = set(on) - set(TECHNIQUES)
        if unknown:
            raise ValueError(f"unknown techniques {sorted(unknown)}; choose from {TECHNIQUES}")
        self.on, self.temperature = set(on), temperature
        self.model = model.to(memory_format=torch.channels_last) if "channels_last" in on else model
        if "multi_tensor_lars" in on:
            from fastclr.optim import LARS, param_groups

            self.opt = LARS(param_groups(self.model, 1e-6), lr=lr, momentum=0.9, trust_coefficient=1e-3)
        else:
            self.opt = PlainLARS(self.model.parameters(), lr=lr)
        self.device = next(self.model.parameters()).device

    def __call__(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([view_a, view_b])
        if "channels_last" in self.on:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if "bf16" in self.on
                    else contextlib.nullcontext())
        with autocast:
            z = self.model(x)
        z_a, z_b = z.float().chunk(2)
        if "tiled_loss" in self.on:
            from fastclr.losses import nt_xent

            loss = nt_xent(z_a, z_b, self.temperature, impl="tiled")
        else:
            loss = plain_nt_xent(z_a, z_b, self.temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()
