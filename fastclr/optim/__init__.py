"""Optimization: LARS, the parameter groups it runs on, and the LR schedule."""
from .lars import LARS
from .param_groups import excluded_names, param_groups
from .schedule import lr_at, scaled_lr

__all__ = ["LARS", "excluded_names", "lr_at", "param_groups", "scaled_lr"]
