"""The configuration tree of a pretraining run: typed sections, one documented field each, validated on creation.

Choices are the ``Literal`` types of :mod:`.choices` (re-exported here). Every section checks itself in
``__post_init__`` and fails with a :class:`ConfigError` naming the field; checks that need the world size or the
machine live in :mod:`fastclr.config.run`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .checks import ConfigError, _at_least, _check, _check_choice, choices  # noqa: F401  (re-exported)
from .choices import Arch, Backend, Compile, CompileMode, Dataset, Dtype, LossImpl, LrScaling  # noqa: F401
from .tasks import DistillConfig, FinetuneConfig, LinearConfig  # the sections of linear/finetune/distill


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
        _at_least(self, "data.augment", 0, "jitter_strength")
        lo, hi = self.blur_sigma
        _check(0 < lo <= hi, "data.augment.blur_sigma", f"need 0 < lo <= hi, got {self.blur_sigma}")
        _check(0 < self.blur_kernel_frac <= 1, "data.augment.blur_kernel_frac", f"must lie in (0, 1], got {self.blur_kernel_frac}")
        _check(len(self.mean) == 3 and len(self.std) == 3, "data.augment.mean/std", "need 3 values each")
        _check(all(s > 0 for s in self.std), "data.augment.std", f"must be positive, got {self.std}")


@dataclass
class DataConfig:
    dataset: Dataset = "digits"
    """'digits' (scikit-learn's bundled handwritten digits, no download), 'folder' (class sub-folders),
    'filelist' (a text file of 'path [label]' lines), 'tar' (webdataset-style tar shards: a .tar, a folder of them, a
    glob, a brace range such as train-{000000..001023}.tar, or a .txt list of shards), or 'auto' (the kind each path
    is: shards as for 'tar', a folder of class folders, else a file list)."""
    path: str = ""
    """Training data: folder, file list or tar shards (see ``dataset``). Unused for 'digits'."""
    eval_path: str = ""
    """Held-out labelled data for kNN / linear probe (same kind as ``path``). Unused for 'digits'."""
    exclude: str = ""
    """A file naming samples to leave out, one per line in the first tab-separated column: a path, or
    ``shard.tar:member`` for tar shards (the ``*.bad.tsv`` list ``fastclr data check`` writes). Applies to both
    splits. Bad images not listed are still found and skipped while training; listing them saves the screening."""
    image_size: int = 32
    """Side of the square crops fed to the network: 32 for CIFAR-like data, 224 for ImageNet."""
    eval_image_size: int = 0
    """Side of the evaluation's centre crops (kNN bank, probe, test split); 0: image_size. Random-resized crops
    magnify objects by 1/sqrt(crop area) on average (1.38x for areas in [0.2, 1]), so a network tested on whole
    images sees them smaller than it learned them; testing at a larger side than training's matches the two
    (Touvron et al. 2019, "Fixing the train-test resolution discrepancy"), and training at the smaller side costs
    (image_size / eval_image_size)^2 of the FLOPs."""
    eval_resize: int = 0
    """Evaluation: resize the shorter side to this before the centre crop (0: eval side·8/7, the usual 256→224)."""
    num_threads: int = 2
    """Pipeline worker threads per rank."""
    prefetch: int = 2
    """Batches prepared ahead of the training step."""
    seed: int = 0
    """Shuffling/augmentation seed; the same seed and world size give the same batches."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def eval_size(self) -> int:
        """The evaluation's crop side."""
        return self.eval_image_size or self.image_size

    def __post_init__(self):
        _check_choice(self.dataset, Dataset, "data.dataset", "dataset")
        if self.dataset != "digits":
            _check(bool(self.path), "data.path",
                   f"dataset '{self.dataset}' needs the training data's location; recipes hold none, pass it on the "
                   "command line, e.g. 'data.path=/data/imagenet/train-{000000..001023}.tar' (tar shards; quoted, or "
                   "the shell expands the braces) or data.path=/data/imagenet/train (class folders), and "
                   "data.eval_path= for the held-out split")
        _check(not (self.exclude and self.dataset == "digits"), "data.exclude",
               "the embedded digits have no files to exclude")
        _at_least(self, "data", 8, "image_size")
        _check(self.eval_image_size == 0 or self.eval_image_size >= 8, "data.eval_image_size",
               f"must be 0 (= image_size) or >= 8, got {self.eval_image_size}")
        _at_least(self, "data", 0, "eval_resize")
        _at_least(self, "data", 1, "num_threads", "prefetch")


@dataclass
class ModelConfig:
    arch: Arch = "resnet18"
    """Backbone: resnet18, resnet34, resnet50, resnet101 or resnet152 (torchvision parameter names)."""
    width_mult: float = 1.0
    """Channel multiplier of every stage (0.25 → ResNet-18 with 16 base channels: a CPU-sized net; SimCLR v2 uses
    2 and 3)."""
    sk_ratio: float = 0.0
    """Selective kernels (SimCLR v2, Chen et al. 2020b): 0 = off; SimCLR v2 uses 0.0625, the attention's reduction
    (max(width·sk_ratio, 32) channels). Also switches the stem and projection shortcuts to ResNet-D's, as v2 does.
    Backbone parameters: ResNet-50 1× 23.5M, with SK 35.2M; ResNet-152 3× with SK 794.7M (v2's Table 1: 24M, 35M,
    795M)."""
    cifar_stem: bool = False
    """3×3 stride-1 first conv and no max-pool, for 32-px images."""
    stem_stride: int = 1
    """Stride of the CIFAR stem's conv: 2 halves every feature map (a quarter of the FLOPs at the same width, so
    twice the width at the same FLOPs). Needs cifar_stem."""
    zero_init_residual: bool = False
    """Zero-init the last BN gamma of each residual block (Goyal et al. 2017)."""
    proj_hidden_dim: int = 2048
    """Projection head hidden width (SimCLR: 2048 for ResNet-50)."""
    proj_out_dim: int = 128
    """Projection output dimension (SimCLR: 128)."""
    proj_layers: int = 2
    """2 = SimCLR v1 head, 3 = SimCLR v2 head."""
    momentum: float = 0.0
    """SimCLR v2's momentum encoder: base EMA momentum (0: off; MoCo/v2 0.999), rising to 1 along a cosine. Needs
    loss.memory_size: its keys are the queue's negatives."""
    compile: Compile = "auto"
    """torch.compile the network: 'auto' (on CUDA, off on CPU, where compiling takes a minute for a few % of speed),
    'true' or 'false'."""
    compile_mode: CompileMode = "default"
    """torch.compile mode: 'default', 'reduce-overhead' (CUDA graphs) or 'max-autotune'."""

    def __post_init__(self):
        _check_choice(self.arch, Arch, "model.arch", "model")
        _check(self.width_mult > 0, "model.width_mult", f"must be > 0, got {self.width_mult}")
        _check(self.stem_stride in (1, 2) and (self.stem_stride == 1 or self.cifar_stem), "model.stem_stride",
               f"must be 1, or 2 with model.cifar_stem=true, got {self.stem_stride}")
        _check(0.0 <= self.sk_ratio <= 1.0, "model.sk_ratio",
               f"must lie in [0, 1] (0 = off, SimCLR v2: 0.0625), got {self.sk_ratio}")
        _at_least(self, "model", 1, "proj_hidden_dim", "proj_out_dim", "proj_layers")
        _check_choice(self.compile, Compile, "model.compile", "compile setting")
        _check(0.0 <= self.momentum < 1.0, "model.momentum", f"must lie in [0, 1) (0 = off), got {self.momentum}")
        _check_choice(self.compile_mode, CompileMode, "model.compile_mode",
                      "compile mode")


@dataclass
class LossConfig:
    temperature: float = 0.1
    """NT-Xent temperature τ (SimCLR: 0.1 at batch 4096 with LARS, 0.5 for CIFAR)."""
    impl: LossImpl = "auto"
    """'auto' (triton on CUDA, tiled on CPU), 'naive' (materializes 2N×2N), 'tiled', 'triton'."""
    global_negatives: bool = True
    """Score local anchors against the embeddings of every rank (google-research/simclr's cross-replica negatives)."""
    memory_size: int = 0
    """SimCLR v2's memory: a FIFO of this many momentum-encoder keys (the global batch's, identical on every rank),
    extra negatives for every anchor (0: off; needs model.momentum > 0)."""

    def __post_init__(self):
        _check(math.isfinite(self.temperature) and self.temperature > 0, "loss.temperature",
               f"must be a positive number, got {self.temperature}")
        _check_choice(self.impl, LossImpl, "loss.impl", "impl")
        _at_least(self, "loss", 0, "memory_size")


@dataclass
class OptimConfig:
    base_lr: float = 0.3
    """Base LR; the peak LR is scaled by the global batch with ``lr_scaling`` (SimCLR: 0.3 linear, 0.075 sqrt)."""
    lr_scaling: LrScaling = "linear"
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
        _check_choice(self.lr_scaling, LrScaling, "optim.lr_scaling", "LR scaling rule")
        _at_least(self, "optim", 0, "weight_decay")
        _check(0 <= self.momentum < 1, "optim.momentum", f"must lie in [0, 1), got {self.momentum}")
        _check(self.trust_coefficient > 0, "optim.trust_coefficient", f"must be > 0, got {self.trust_coefficient}")
        _at_least(self, "optim", 0, "warmup_epochs", "final_lr")


@dataclass
class TrainConfig:
    epochs: float = 100.0
    """Length of the run in epochs (fractions allowed for smoke runs)."""
    max_minutes: float = 0.0
    """If > 0, the schedule is unchanged but the run stops cleanly (with a checkpoint) after this many minutes."""
    time_budget_minutes: float = 0.0
    """If > 0, choose train.epochs (at most the configured value: a fast machine runs that, a slow one fewer, each
    with its whole warm-up and cosine) so that the whole run — warm-up, cosine, monitor evaluations, checkpoints and the
    final evaluation — ends within this many minutes, from the speed measured during the warm-up (which must last at
    least a few steps). The choice is printed and saved in config.yaml and the checkpoint; resume keeps it. A budget
    too short for optim.warmup_epochs shortens the warm-up to half the run (with a warning)."""
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
        _at_least(self, "train", 0, "max_minutes", "stop_at_step", "time_budget_minutes")
        _at_least(self, "train", 2, "global_batch_size")
        _at_least(self, "train", 0, "micro_batch_size")
        _at_least(self, "train", 1, "log_every", "max_nonfinite_steps")


@dataclass
class PrecisionConfig:
    dtype: Dtype = "auto"
    """Autocast dtype: 'bf16' (CPU and GPU), 'fp16' (GPU only, dynamic loss scaling), 'fp32' (autocast off) or
    'auto': bf16 on a GPU that has it (fp16 on older ones), and on a CPU with native bf16 (AVX512-BF16 or AMX);
    fp32 on other CPUs, where bf16 is emulated and measured 5-10x slower than fp32 (AVX2-only AMD EPYC).
    Parameters, BN statistics and LARS state stay fp32 in every mode."""
    channels_last: bool = True
    """NHWC activations end to end."""

    def __post_init__(self):
        _check_choice(self.dtype, Dtype, "precision.dtype", "dtype")


@dataclass
class DistributedConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage. LARS needs whole tensors for its per-layer trust ratios: only 0 is accepted."""
    global_bn: bool = True
    """BatchNorm statistics over all ranks (or groups of ``bn_group_size`` ranks), as SimCLR's global BN."""
    bn_group_size: int = 0
    """Ranks per BN group; 0 = all ranks."""
    overlap_comm: bool = True
    """All-reduce each gradient bucket as soon as backward completes it, while the rest of backward runs."""
    bucket_mb: float = 25.0
    """Gradient bucket size in MB (DDP's default 25). Smaller buckets start communicating earlier; each costs one
    collective's latency."""
    first_bucket_mb: float = 1.0
    """Cap of the first bucket (the head and last layers, whose gradients come first), as DDP's 1 MB: its all-reduce
    starts while most of backward is still to run, even when the whole model would fit one bucket."""
    backend: Backend = "auto"
    """'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'."""
    timeout: float = 600.0
    """Seconds a collective waits for the other ranks before this rank gives up and exits (code 4) naming the
    failure; passed to the process group (600 = DeepSpeed's and NCCL's default). A rank that dies is noticed at once on
    gloo (its sockets close: 12 ms measured); one that hangs (SIGSTOP, a stuck filesystem) only through this timeout.
    It must exceed the longest time a rank legitimately waits for the others: the spread of their start-up (a first
    start JIT-compiles DeepSpeed's CPU op, ~30 s) and rank 0's checkpoint fsync."""

    def __post_init__(self):
        _check(self.zero_stage in (0, 1, 2, 3), "distributed.zero_stage", f"must be 0–3, got {self.zero_stage}")
        _at_least(self, "distributed", 0, "bn_group_size")
        _check(self.bucket_mb > 0, "distributed.bucket_mb", f"must be > 0, got {self.bucket_mb}")
        _check(self.first_bucket_mb > 0, "distributed.first_bucket_mb", f"must be > 0, got {self.first_bucket_mb}")
        _check_choice(self.backend, Backend, "distributed.backend", "backend")
        _check(math.isfinite(self.timeout) and self.timeout > 0, "distributed.timeout",
               f"must be a positive number of seconds (e.g. 600), got {self.timeout}")


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    """Where DeepSpeed checkpoints and client state go."""
    every_steps: int = 0
    """Save every this many optimizer steps (0: only at epoch ends selected by ``every_epochs`` and at the end)."""
    every_epochs: int = 5
    """Save every this many epochs (0: off)."""
    every_minutes: float = 30.0
    """Save when this many minutes have passed since the last checkpoint (0: off), decided by all ranks together:
    the most work a crash, a killed rank or a lost node can cost, whatever the epoch length."""
    keep: int = 2
    """How many complete checkpoints to keep (oldest removed after a newer one is complete). Keep 2 or more: a
    newest checkpoint found damaged at resume is set aside and the one before it used."""
    resume: str = "auto"
    """'auto' (latest complete checkpoint in ``dir`` if any), 'none', or a checkpoint tag/path."""

    def __post_init__(self):
        _at_least(self, "checkpoint", 0, "every_steps", "every_epochs")
        _at_least(self, "checkpoint", 1, "keep")
        _check(math.isfinite(self.every_minutes) and self.every_minutes >= 0, "checkpoint.every_minutes",
               f"must be >= 0 minutes (0: off), got {self.every_minutes}")


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
        _at_least(self, "eval", 1, "knn_k")
        _check(self.knn_temperature > 0, "eval.knn_temperature", f"must be > 0, got {self.knn_temperature}")
        _at_least(self, "eval", 0, "probe_epochs")
        _check(self.probe_lr > 0, "eval.probe_lr", f"must be > 0, got {self.probe_lr}")
        _at_least(self, "eval", 0, "every_epochs", "max_eval_images")


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
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0
    """Seed of model initialisation and every random stream derived from it."""


