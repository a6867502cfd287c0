"""Losses: NT-Xent (SimCLR) and the implementations behind it; SimCLR v2's distillation loss."""
from .distill import distill_loss
from .ntxent import IMPLS, nt_xent, ntxent_naive
from .tiled import anchor_columns, ntxent_tiled

__all__ = ["IMPLS", "distill_loss", "nt_xent", "ntxent_naive", "ntxent_tiled", "anchor_columns"]
