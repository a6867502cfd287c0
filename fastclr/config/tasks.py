"""The config sections of the supervised steps after pretraining: linear evaluation, SimCLR v2 fine-tuning and
distillation (``fastclr linear | finetune | distill``).

Each section holds what its command trains with; the network, data, precision and world come from the pretraining
run's own config (saved in every checkpoint), so ``fastclr finetune CKPT`` needs no other file. Defaults are the
published protocols at a batch of 256 (the LR follows the batch through ``lr_scaling``); the shipped recipes
``linear_imagenet``, ``finetune_imagenet_1pct``/``10pct`` and ``distill_imagenet`` carry the papers' batches, and
the ``*_cifar10`` ones the settings measured on the 2-core CPU.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from .checks import _at_least, _check, _check_choice
from .choices import Arch, LrScaling, Optimizer, StudentArch, StudentInit

LABEL_FRACTION = re.compile(r"^(\d+(?:\.\d+)?)%$")
"""``--labels 1%``: a class-balanced fraction of the training labels; anything else names a file list."""


def label_fraction(labels: str) -> float | None:
    """``"10%"`` → 0.1; None for a file list. Raises ValueError for a percentage outside (0, 100]."""
    m = LABEL_FRACTION.match(labels.strip())
    if m is None:
        return None
    fraction = float(m.group(1)) / 100
    if not 0 < fraction <= 1:
        raise ValueError(f"a label fraction must lie in (0%, 100%], got {labels!r}")
    return fraction


def _check_training(section, name: str) -> None:
    """The checks every supervised section shares (same field names in each)."""
    _check(section.epochs > 0, f"{name}.epochs", f"must be > 0, got {section.epochs}")
    _at_least(section, name, 1, "global_batch_size", "log_every")
    _at_least(section, name, 0, "micro_batch_size")
    _check_choice(section.optimizer, Optimizer, f"{name}.optimizer", "optimizer")
    _check(section.base_lr > 0, f"{name}.base_lr", f"must be > 0, got {section.base_lr}")
    _check_choice(section.lr_scaling, LrScaling, f"{name}.lr_scaling", "LR scaling rule")
    _check(0 <= section.momentum < 1, f"{name}.momentum", f"must lie in [0, 1), got {section.momentum}")
    _at_least(section, name, 0, "weight_decay", "warmup_epochs")
    _check(section.warmup_epochs < section.epochs, f"{name}.warmup_epochs",
           f"{section.warmup_epochs} is not shorter than the run ({name}.epochs={section.epochs})")
    lo, hi = section.crop_area
    _check(0 < lo <= hi <= 1, f"{name}.crop_area", f"need 0 < lo <= hi <= 1, got {section.crop_area}")


def _check_labels(labels: str, name: str, allow_empty: bool = False) -> None:
    """A percentage in (0, 100] or a file name. Whether the file exists is checked by the command that reads it: a
    config saved on another machine must still load."""
    if allow_empty and not labels:
        return
    _check(bool(labels.strip()), name, "give a label fraction such as 1% or 10%, or a file list of labelled samples")
    try:
        label_fraction(labels)
    except ValueError as e:
        _check(False, name, str(e))


@dataclass
class LinearConfig:
    """The linear evaluation protocol (Chen et al. 2020, appendix B.6; google-research/simclr README, "fine-tune a
    linear head"): a linear classifier on the frozen backbone in eval mode, random-resized crops and flips, Nesterov
    momentum, cosine LR without warm-up; top-1 and top-5 on the held-out split."""

    epochs: float = 90.0
    """Epochs over the training split (SimCLR: 90 on ImageNet)."""
    global_batch_size: int = 256
    """Images per step over all ranks (SimCLR: 4096 on ImageNet)."""
    micro_batch_size: int = 0
    """Images per rank per forward pass (0: global / world size)."""
    optimizer: Optimizer = "sgd"
    """'sgd' (Nesterov momentum, the reference's ``--optimizer=momentum``) or 'lars'."""
    base_lr: float = 0.1
    """Base LR, scaled by ``lr_scaling`` (reference: 0.1 linear, 1.6 at 4096)."""
    lr_scaling: LrScaling = "linear"
    """'linear' (base·B/256), 'sqrt' (base·√B) or 'none' (as in optim.lr_scaling)."""
    momentum: float = 0.9
    weight_decay: float = 1e-6
    """On the classifier's weight (reference ImageNet command: 1e-6; its CIFAR command: 0)."""
    warmup_epochs: float = 0.0
    crop_area: tuple[float, float] = (0.08, 1.0)
    """Random-resized-crop area range of the training views (flip 0.5, aspect 3/4–4/3, no colour distortion)."""
    log_every: int = 50
    """Steps between metric lines."""
    dir: str = ""
    """Output folder (metrics, result.json); empty: ``<logging.dir>/linear``."""

    def __post_init__(self):
        _check_training(self, "linear")


@dataclass
class FinetuneConfig:
    """SimCLR v2 fine-tuning (Chen et al. 2020b, sec. 2 and 4): the backbone and the first ``from_head_layer``
    layers of the projection head, then a new linear classifier; the whole network trains on a class-balanced
    subset of the labels, LARS, no weight decay, no warm-up, global BN, random-resized crops and flips."""

    labels: str = "10%"
    """'1%', '10%', …: a class-balanced subset drawn with ``subset_seed``; or a file list of the labelled samples
    (one name per line: a path, a tar member, or a file name as in google-research/simclr's imagenet_subsets)."""
    subset_seed: int = 0
    """Seed of the class-balanced subset; the same seed and dataset give the same samples."""
    from_head_layer: int = 1
    """Head layers kept under the classifier: 0 = from the backbone (v1), 1 = from the first layer of the head (v2's
    choice for 1% and 10% labels), up to model.proj_layers."""
    epochs: float = 30.0
    """v2 (and v1): 60 epochs on 1% of ImageNet, 30 on 10% and on 100%."""
    global_batch_size: int = 256
    """v2: 1024."""
    micro_batch_size: int = 0
    optimizer: Optimizer = "lars"
    base_lr: float = 0.005
    """v2: 0.16 = 0.005·√1024 for standard ResNets, 0.064 = 0.002·√1024 for wider ones and SK."""
    lr_scaling: LrScaling = "sqrt"
    momentum: float = 0.9
    weight_decay: float = 0.0
    """v2 removes weight decay for fine-tuning."""
    warmup_epochs: float = 0.0
    crop_area: tuple[float, float] = (0.08, 1.0)
    zero_init_classifier: bool = True
    """Start the new classifier at zero (the reference's ``--zero_init_logits_layer``)."""
    log_every: int = 10
    dir: str = ""
    """Output folder (the fine-tuned network ``classifier.pt``, metrics, label list); empty:
    ``<logging.dir>/finetune``."""

    def __post_init__(self):
        _check_training(self, "finetune")
        _check_labels(self.labels, "finetune.labels")
        _at_least(self, "finetune", 0, "from_head_layer")


@dataclass
class DistillConfig:
    """SimCLR v2 distillation (Chen et al. 2020b, sec. 2, eq. 2–3): a student trained on the unlabelled training
    split against the fine-tuned teacher's temperature-softened predictions on the same view, optionally plus the
    labelled loss on the teacher's labelled subset. v2: τ = 1, the pretraining's LR schedule, weight decay and batch
    (LARS, 0.1·√B, 1e-4, 4096), 400 epochs, random crops and flips only."""

    temperature: float = 1.0
    """τ of both softmaxes (v2: 1)."""
    label_weight: float = 0.0
    """Weight (1 − α in v2's eq. 3) of the cross-entropy on the labelled subset; 0: unlabelled examples only (v2's
    default)."""
    labels: str = ""
    """Labelled subset for ``label_weight`` > 0 (same forms as finetune.labels); empty: the teacher's."""
    student_arch: StudentArch = ""
    """Student backbone (resnet18 … resnet152); empty: the teacher's network (self-distillation)."""
    student_width_mult: float = 1.0
    """Student width (with ``student_arch``)."""
    student_sk_ratio: float = 0.0
    """Student selective kernels (with ``student_arch``; 0 = off)."""
    student_init: StudentInit = "random"
    """'random' (v2) or 'teacher' (start from the teacher's backbone; self-distillation only)."""
    epochs: float = 400.0
    global_batch_size: int = 256
    """v2: 4096."""
    micro_batch_size: int = 0
    optimizer: Optimizer = "lars"
    base_lr: float = 0.1
    lr_scaling: LrScaling = "sqrt"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 20.0
    """v2 pretraining warms up for the first 5% of the epochs (20 of 400)."""
    crop_area: tuple[float, float] = (0.08, 1.0)
    log_every: int = 10
    dir: str = ""
    """Output folder (the student ``classifier.pt``, metrics); empty: ``<logging.dir>/distill``."""

    def __post_init__(self):
        _check_training(self, "distill")
        _check(math.isfinite(self.temperature) and self.temperature > 0, "distill.temperature",
               f"must be a positive number, got {self.temperature}")
        _check(0 <= self.label_weight <= 1, "distill.label_weight", f"must lie in [0, 1], got {self.label_weight}")
        _check_labels(self.labels, "distill.labels", allow_empty=True)
        _check(self.student_width_mult > 0, "distill.student_width_mult", f"must be > 0, got {self.student_width_mult}")
        _check(0 <= self.student_sk_ratio <= 1, "distill.student_sk_ratio", f"must lie in [0, 1], got "
               f"{self.student_sk_ratio}")
        _check_choice(self.student_init, StudentInit, "distill.student_init", "student init")
        if self.student_arch:
            _check_choice(self.student_arch, Arch, "distill.student_arch", "arch")
