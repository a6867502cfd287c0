"""One typed configuration tree for a pretraining run.

Recipes are small YAML files (``launchers/configs/*.yaml``) that override the defaults below; ``key=value`` command-line
overrides are applied last (``optim.base_lr=0.5``, ``model.arch=resnet50``). Every section validates itself in
``__post_init__`` and :func:`validate_run` checks what depends on the world size, so a bad config fails before any
compute with a message naming the field. The DeepSpeed config is derived from this tree (:func:`deepspeed_config`),
never written by hand: the global batch has exactly one source.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


@dataclass
class AugmentConfig:
    """SimCLR augmentation (Chen et al. 2020, appendix A). Two independent views per decoded image."""

    crop_area: tuple[float, float] = (0.08, 1.0)
    """Random-resized-crop area fraction range."""
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    """Random-resized-crop aspect-ratio range."""
    flip_p: float = 0.5
    """Horizontal flip probability."""
    jitter_p: float = 0.8
    """Probability of applying colour jitter."""
    jitter_strength: float = 1.0
    """s: brightness/contrast/saturation 0.8·s, hue 0.2·s. 1.0 for ImageNet, 0.5 for CIFAR."""
    grayscale_p: float = 0.2
    """Probability of converting to grayscale."""
    blur_p: float = 0.5
    """Gaussian blur probability; set 0 for 32-px recipes (the paper turns blur off on CIFAR)."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range, in pixels of the output image."""
    blur_kernel_frac: float = 0.1
    """Blur kernel side as a fraction of the image side (rounded to an odd size ≥ 3)."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel normalization mean, on a 0–1 scale."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel normalization std, on a 0–1 scale."""

    def __post_init__(self):
        lo, hi = self.crop_area
        _check(0 < lo <= hi <= 1, "data.augment.crop_area", f"need 0 < lo <= hi <= 1, got {self.crop_area}")
        lo, hi = self.crop_aspect
        _check(0 < lo <= hi, "data.augment.crop_aspect", f"need 0 < lo <= hi, got {self.crop_aspect}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"data.augment.{name}", f"a probability must lie in [0, 1], got {v}")
        _check(self.jitter_strength >= 0, "data.augment.jitter_strength", f"must be >= 0, got {self.jitter_strength}")
        lo, hi = self.blur_sigma
        _check(0 < lo <= hi, "data.augment.blur_sigma", f"need 0 < lo <= hi, got {self.blur_sigma}")
        _check(0 < self.blur_kernel_frac <= 1, "data.augment.blur_kernel_frac", f"must lie in (0, 1], got {self.blur_kernel_frac}")
        _check(len(self.mean) == 3 and len(self.std) == 3, "data.augment.mean/std", "need 3 values each")
        _check(all(s > 0 for s in self.std), "data.augment.std", f"must be positive, got {self.std}")


DATASETS = ("digits", "folder", "filelist", "tar")


@dataclass
class DataConfig:
    dataset: str = "digits"
    """'digits' (scikit-learn's bundled handwritten digits, no download), 'folder' (class sub-folders),
    'filelist' (a text file of 'path [label]' lines), 'tar' (webdataset-style tar shards, path or glob)."""
    path: str = ""
    """Training data: folder, file list or tar glob. Unused for 'digits'."""
    eval_path: str = ""
    """Held-out labelled data for kNN / linear probe (same kind as ``path``). Unused for 'digits'."""
    exclude: str = ""
    """A file naming samples to leave out, one per line in the first tab-separated column: a path, or
    ``shard.tar:member`` for tar shards (the ``*.bad.tsv`` list ``fastclr data check`` writes). Applies to both
    splits. Bad images not listed are still found and skipped while training; listing them saves the screening."""
    image_size: int = 32
    """Side of the square crops fed to the network: 32 for CIFAR-like data, 224 for ImageNet."""
    eval_resize: int = 0
    """Evaluation: resize the shorter side to this before the centre crop (0: image_size·8/7, the usual 256→224)."""
    num_threads: int = 2
    """Pipeline worker threads per rank."""
    prefetch: int = 2
    """Batches prepared ahead of the training step."""
    seed: int = 0
    """Shuffling/augmentation seed; the same seed and world size give the same batches."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        _check(self.dataset in DATASETS, "data.dataset", f"unknown dataset '{self.dataset}'; choose one of {DATASETS}")
        if self.dataset != "digits":
            _check(bool(self.path), "data.path", f"dataset '{self.dataset}' needs a path")
        _check(not (self.exclude and self.dataset == "digits"), "data.exclude",
               "the embedded digits have no files to exclude")
        _check(self.image_size >= 8, "data.image_size", f"must be >= 8, got {self.image_size}")
        _check(self.eval_resize >= 0, "data.eval_resize", f"must be >= 0, got {self.eval_resize}")
        _check(self.num_threads >= 1, "data.num_threads", f"must be >= 1, got {self.num_threads}")
        _check(self.prefetch >= 1, "data.prefetch", f"must be >= 1, got {self.prefetch}")


ARCHS = ("resnet18", "resnet34", "resnet50")


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    """Backbone: resnet18, resnet34 or resnet50 (torchvision parameter names)."""
    width_mult: float = 1.0
    """Channel multiplier of every stage (0.25 → ResNet-18 with 16 base channels: a CPU-sized net)."""
    cifar_stem: bool = False
    """3×3 stride-1 first conv and no max-pool, for 32-px images."""
    zero_init_residual: bool = False
    """Zero-init the last BN gamma of each residual block (Goyal et al. 2017)."""
    proj_hidden_dim: int = 2048
    """Projection head hidden width (SimCLR: 2048 for ResNet-50)."""
    proj_out_dim: int = 128
    """Projection output dimension (SimCLR: 128)."""
    proj_layers: int = 2
    """2 = SimCLR v1 head, 3 = SimCLR v2 head."""

    def __post_init__(self):
        _check(self.arch in ARCHS, "model.arch", f"unknown model '{self.arch}'; choose one of {ARCHS}")
        _check(self.width_mult > 0, "model.width_mult", f"must be > 0, got {self.width_mult}")
        _check(self.proj_hidden_dim >= 1, "model.proj_hidden_dim", f"must be >= 1, got {self.proj_hidden_dim}")
        _check(self.proj_out_dim >= 1, "model.proj_out_dim", f"must be >= 1, got {self.proj_out_dim}")
        _check(self.proj_layers >= 1, "model.proj_layers", f"must be >= 1, got {self.proj_layers}")


LOSS_IMPLS = ("auto", "naive", "tiled", "triton")


@dataclass
class LossConfig:
    temperature: float = 0.1
    """NT-Xent temperature τ (SimCLR: 0.1 at batch 4096 with LARS, 0.5 for CIFAR)."""
    impl: str = "auto"
    """'auto' (triton on CUDA, tiled on CPU), 'naive' (materializes 2N×2N), 'tiled', 'triton'."""
    global_negatives: bool = True
    """Score local anchors against the embeddings of every rank (google-research/simclr's cross-replica negatives)."""

    def __post_init__(self):
        _check(math.isfinite(self.temperature) and self.temperature > 0, "loss.temperature",
               f"must be a positive number, got {self.temperature}")
        _check(self.impl in LOSS_IMPLS, "loss.impl", f"unknown impl '{self.impl}'; choose one of {LOSS_IMPLS}")


@dataclass
class OptimConfig:
    base_lr: float = 0.3
    """Base LR; the peak LR is scaled by the global batch with ``lr_scaling`` (SimCLR: 0.3 linear, 0.075 sqrt)."""
    lr_scaling: str = "linear"
    """'linear' (base·B/256), 'sqrt' (base·√B) or 'none' (base as is)."""
    weight_decay: float = 1e-6
    """Weight decay on conv/linear weights only (never BN or bias). SimCLR: 1e-6."""
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    """LARS η (You et al. 2017)."""
    warmup_epochs: float = 10.0
    """Linear warm-up length in epochs (SimCLR: 10)."""
    final_lr: float = 0.0
    """LR reached by the cosine at the last step."""

    def __post_init__(self):
        _check(self.base_lr > 0, "optim.base_lr", f"must be > 0, got {self.base_lr}")
        _check(self.lr_scaling in ("linear", "sqrt", "none"), "optim.lr_scaling",
               f"choose linear, sqrt or none, got '{self.lr_scaling}'")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.momentum < 1, "optim.momentum", f"must lie in [0, 1), got {self.momentum}")
        _check(self.trust_coefficient > 0, "optim.trust_coefficient", f"must be > 0, got {self.trust_coefficient}")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(self.final_lr >= 0, "optim.final_lr", f"must be >= 0, got {self.final_lr}")


@dataclass
class TrainConfig:
    epochs: float = 100.0
    """Length of the run in epochs (fractions allowed for smoke runs)."""
    max_minutes: float = 0.0
    """If > 0, the schedule is unchanged but the run stops cleanly (with a checkpoint) after this many minutes."""
    stop_at_step: int = 0
    """If > 0, stop cleanly (with a checkpoint) after this optimizer step; the schedule still spans ``epochs``."""
    global_batch_size: int = 256
    """Images per optimizer step over all ranks (each gives two views). = micro × accumulation × world size."""
    micro_batch_size: int = 0
    """Images per rank per forward pass (0: global_batch_size / world size, no accumulation)."""
    log_every: int = 10
    """Steps between metric lines (each one is a host sync)."""
    max_nonfinite_steps: int = 20
    """A step whose gradients hold inf/NaN is skipped (parameters and LARS state untouched) and counted; this many in
    a row stop the run with an error, leaving the last complete checkpoint as it was."""

    def __post_init__(self):
        _check(self.epochs > 0, "train.epochs", f"must be > 0, got {self.epochs}")
        _check(self.max_minutes >= 0, "train.max_minutes", f"must be >= 0, got {self.max_minutes}")
        _check(self.stop_at_step >= 0, "train.stop_at_step", f"must be >= 0, got {self.stop_at_step}")
        _check(self.global_batch_size >= 2, "train.global_batch_size", f"must be >= 2, got {self.global_batch_size}")
        _check(self.micro_batch_size >= 0, "train.micro_batch_size", f"must be >= 0, got {self.micro_batch_size}")
        _check(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _check(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps",
               f"must be >= 1, got {self.max_nonfinite_steps}")


@dataclass
class PrecisionConfig:
    dtype: str = "bf16"
    """Autocast dtype: 'bf16' (CPU and GPU), 'fp16' (GPU only, dynamic loss scaling) or 'fp32' (autocast off).
    Parameters, BN statistics and LARS state stay fp32 in every mode."""
    channels_last: bool = True
    """NHWC activations end to end."""

    def __post_init__(self):
        _check(self.dtype in ("bf16", "fp16", "fp32"), "precision.dtype", f"choose bf16, fp16 or fp32, got '{self.dtype}'")


@dataclass
class DistributedConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage. LARS needs whole tensors for its per-layer trust ratios: only 0 is accepted."""
    global_bn: bool = True
    """BatchNorm statistics over all ranks (or groups of ``bn_group_size`` ranks), as SimCLR's global BN."""
    bn_group_size: int = 0
    """Ranks per BN group; 0 = all ranks."""
    backend: str = "auto"
    """'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'."""

    def __post_init__(self):
        _check(self.zero_stage in (0, 1, 2, 3), "distributed.zero_stage", f"must be 0–3, got {self.zero_stage}")
        _check(self.bn_group_size >= 0, "distributed.bn_group_size", f"must be >= 0, got {self.bn_group_size}")
        _check(self.backend in ("auto", "nccl", "gloo"), "distributed.backend",
               f"choose auto, nccl or gloo, got '{self.backend}'")


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    """Where DeepSpeed checkpoints and client state go."""
    every_steps: int = 0
    """Save every this many optimizer steps (0: only at epoch ends selected by ``every_epochs`` and at the end)."""
    every_epochs: int = 5
    """Save every this many epochs (0: off)."""
    keep: int = 2
    """How many complete checkpoints to keep (oldest removed after a newer one is complete)."""
    resume: str = "auto"
    """'auto' (latest complete checkpoint in ``dir`` if any), 'none', or a checkpoint tag/path."""

    def __post_init__(self):
        _check(self.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {self.every_steps}")
        _check(self.every_epochs >= 0, "checkpoint.every_epochs", f"must be >= 0, got {self.every_epochs}")
        _check(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    """Run folder: metrics.csv, metrics.jsonl, TensorBoard events, plots, exported backbone."""
    tensorboard: bool = True
    progress: bool = True
    """A progress bar on rank 0 (plain periodic lines when stdout is not a terminal)."""
    timers: bool = False
    """Per-phase step times (data wait, forward, loss, backward, communication, optimizer) in the metrics. On GPU this
    synchronizes the device around each phase, which costs throughput: turn on to find where time goes."""

    def __post_init__(self):
        _check(bool(self.dir), "logging.dir", "must not be empty")


@dataclass
class EvalConfig:
    knn_k: int = 20
    """Neighbours of the kNN monitor (Wu et al. 2018 use 200 on ImageNet; 20 suits small sets)."""
    knn_temperature: float = 0.1
    """Temperature of the kNN vote weights exp(sim/T)."""
    probe_epochs: int = 100
    """Epochs of the linear probe on frozen, once-extracted features."""
    probe_lr: float = 0.1
    every_epochs: int = 0
    """Run the kNN monitor every this many epochs (0: only at the end)."""
    baseline: bool = True
    """Also evaluate a randomly initialised encoder, so the report shows what pretraining bought."""
    max_eval_images: int = 0
    """Cap on images per split used for evaluation (0: all)."""

    def __post_init__(self):
        _check(self.knn_k >= 1, "eval.knn_k", f"must be >= 1, got {self.knn_k}")
        _check(self.knn_temperature > 0, "eval.knn_temperature", f"must be > 0, got {self.knn_temperature}")
        _check(self.probe_epochs >= 0, "eval.probe_epochs", f"must be >= 0, got {self.probe_epochs}")
        _check(self.probe_lr > 0, "eval.probe_lr", f"must be > 0, got {self.probe_lr}")
        _check(self.every_epochs >= 0, "eval.every_epochs", f"must be >= 0, got {self.every_epochs}")
        _check(self.max_eval_images >= 0, "eval.max_eval_images", f"must be >= 0, got {self.max_eval_images}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    """Seed of model initialisation and every random stream derived from it."""


# --------------------------------------------------------------------------------------------------------------- #
# Building from dicts, YAML and key=value overrides


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Convert a YAML/command-line value to the annotated type, or fail naming the field."""
    origin = getattr(typ, "__origin__", None)
    try:
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"config field '{name}': expected a mapping, got {value!r}")
            return _from_dict(typ, value, name + ".")
        if typ is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
            args = typ.__args__
            if len(value) != len(args):
                raise ValueError(value)
            return tuple(_coerce(v, t, name) for v, t in zip(value, args))
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config field '{name}': cannot read {value!r} as {getattr(typ, '__name__', typ)}") from None
    return value


def _from_dict(cls, d: dict, prefix: str = ""):
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"config field '{prefix}{unknown[0]}': unknown; valid fields here: {sorted(names)}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in d.items()})


def to_dict(cfg) -> dict:
    """Plain nested dict (YAML-serialisable: tuples become lists)."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(dataclasses.asdict(cfg))


def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = d
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config field '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML recipe ← ``key=value`` overrides; validated."""
    raw: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key, value)
    return _from_dict(Config, raw)


# --------------------------------------------------------------------------------------------------------------- #
# What depends on the world: batch arithmetic and the derived DeepSpeed config


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    accumulation: int
    world_size: int


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    """global = micro × accumulation × world; the one place this arithmetic lives."""
    g = cfg.train.global_batch_size
    _check(g % world_size == 0, "train.global_batch_size",
           f"{g} is not divisible by the world size {world_size}; use a multiple of {world_size}")
    micro = cfg.train.micro_batch_size or g // world_size
    _check(g % (micro * world_size) == 0, "train.micro_batch_size",
           f"global batch {g} is not divisible by micro batch {micro} × world size {world_size}")
    return BatchPlan(g, micro, g // (micro * world_size), world_size)


def validate_run(cfg: Config, world_size: int, cuda: bool) -> BatchPlan:
    """Checks that need the world size and device; call before building anything."""
    plan = batch_plan(cfg, world_size)
    if cfg.precision.dtype == "fp16" and not cuda:
        raise ConfigError("config field 'precision.dtype': fp16 needs a CUDA GPU (DeepSpeed refuses it on CPU); use bf16")
    if cfg.loss.impl == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("config field 'loss.impl': 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1); use auto or tiled")
    if cfg.distributed.zero_stage != 0:
        raise ConfigError(
            f"config field 'distributed.zero_stage': {cfg.distributed.zero_stage} is refused: ZeRO shards flattened "
            "parameters, which breaks LARS's per-layer trust ratios; use 0")
    gs = cfg.distributed.bn_group_size
    if gs:
        _check(world_size % gs == 0, "distributed.bn_group_size",
               f"{gs} does not divide the world size {world_size}")
    if cfg.distributed.backend == "nccl" and not cuda:
        raise ConfigError("config field 'distributed.backend': nccl needs CUDA; use auto or gloo")
    return plan


def deepspeed_config(cfg: Config, plan: BatchPlan) -> dict:
    """The DeepSpeed config derived from ours. Precision is autocast (BN stays fp32), not DeepSpeed's bf16/fp16 modes
    that cast the whole module; fp16 loss scaling is done by the trainer's GradScaler-like logic."""
    ds: dict = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "gradient_clipping": 0.0,
    }
    if cfg.precision.dtype != "fp32":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if cfg.precision.dtype == "bf16" else "float16"}
    return ds
