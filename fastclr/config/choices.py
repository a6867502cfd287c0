"""The choice types of the config, each a ``Literal`` defined once: the sections (:mod:`.schema`, :mod:`.tasks`)
type their fields with them and check values against them, and the library modules that implement a choice import
the same type, so a choice list has one source."""
from __future__ import annotations

from typing import Literal, get_args

Dataset = Literal["digits", "auto", "folder", "filelist", "tar"]
Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
LossImpl = Literal["auto", "naive", "tiled", "triton"]
LrScaling = Literal["linear", "sqrt", "none"]
Dtype = Literal["auto", "bf16", "fp16", "fp32"]
Backend = Literal["auto", "nccl", "gloo"]
Compile = Literal["auto", "true", "false"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
Optimizer = Literal["lars", "sgd"]
StudentInit = Literal["random", "teacher"]
StudentArch = Literal[("",) + get_args(Arch)]
"""distill.student_arch: an Arch, or empty for the teacher's own network."""
