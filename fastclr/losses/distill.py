"""SimCLR v2's distillation loss (Chen et al. 2020b, eq. 2; Hinton et al. 2015): the cross-entropy of the student's
temperature-softened prediction against the teacher's,

    L = −(1/N) Σ_i Σ_y P_T(y | x_i; τ) · log P_S(y | x_i; τ),   P(y | x; τ) = softmax(f(x) / τ)_y,

on the same view x_i for both networks. The teacher's side carries no gradient. v2 uses τ = 1 and no T² factor
(Hinton's rescaling keeps gradient sizes comparable across temperatures when the soft loss is mixed with a hard one;
v2's eq. 3 mixes them with weights α, 1 − α instead). Computed in fp32 whatever the autocast dtype: a bf16 log-softmax
keeps 8 bits of mantissa (2–3 significant digits), too few for the small probabilities soft targets are made of.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the batch of the soft-target cross-entropy; (N, C) logits each, 0-d fp32 result."""
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(f"student and teacher logits must both be (N, C), got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)} (same classes: the student is trained on the teacher's task)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    targets = F.softmax(teacher_logits.detach().float() / temperature, dim=1)  # (N, C)
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)  # (N, C)
    return -(targets * log_p).sum(dim=1).mean()
