"""Optimization: LARS, Nesterov SGD (both skip a non-finite step on the device), the parameter groups it runs on, the LR schedule, and the non-finite step guard."""
from .lars import LARS
from .nonfinite import SkippedSteps
from .param_groups import excluded_names, param_groups
from .sgd import NesterovSGD
from .schedule import Schedule, lr_at, peak_lr, scaled_lr

__all__ = ["LARS", "NesterovSGD", "Schedule", "SkippedSteps", "excluded_names", "lr_at", "param_groups", "peak_lr", "scaled_lr"]
