"""Contrastive losses: NT-Xent (SimCLR) and the implementations behind it."""
from .ntxent import IMPLS, nt_xent, ntxent_naive
from .tiled import anchor_columns, ntxent_tiled

__all__ = ["IMPLS", "nt_xent", "ntxent_naive", "ntxent_tiled", "anchor_columns"]
