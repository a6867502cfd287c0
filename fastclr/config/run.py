"""What a config means on a given world: batch arithmetic, the checks that need the world or the machine, the derived
DeepSpeed config. Every entry point (the trainer, ``submit.py``, ``fastclr.slurm plan``) calls :func:`validate_run`
before it builds anything, so a bad config fails in seconds, naming the field, on the login node as on a rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .schema import Config, ConfigError, _check


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    accumulation: int
    world_size: int


def batch_plan(cfg: Config, world_size: int, section: str = "train") -> BatchPlan:
    """global = micro × accumulation × world of ``section`` ('train' for pretraining, or the stage's own 'linear',
    'finetune', 'distill'); the one place this arithmetic lives, its errors naming the section's fields."""
    s = getattr(cfg, section)
    g = s.global_batch_size
    _check(g % world_size == 0, f"{section}.global_batch_size",
           f"{g} is not divisible by the world size {world_size}; use a multiple of {world_size}")
    micro = s.micro_batch_size or g // world_size
    _check(g % (micro * world_size) == 0, f"{section}.micro_batch_size",
           f"global batch {g} is not divisible by micro batch {micro} × world size {world_size}")
    return BatchPlan(g, micro, g // (micro * world_size), world_size)


def _exists(path: str, shards: bool) -> bool:
    """Whether ``path`` names something here; for tar datasets a glob or brace pattern must name existing shards."""
    if not shards:
        return os.path.exists(path)
    from ..data.shards import is_pattern, shard_paths  # here: the data package pulls in DALI, which a check need not

    if not is_pattern(path):
        return os.path.exists(path)
    try:
        return bool(shard_paths(path))
    except (FileNotFoundError, ValueError):
        return False


def missing_paths(cfg: Config) -> list[tuple[str, str]]:
    """(field, path) of every data file or folder the config names that this machine cannot see."""
    d, out = cfg.data, []
    if d.dataset != "digits":
        for name, path in (("data.path", d.path), ("data.eval_path", d.eval_path)):
            if path and not _exists(path, d.dataset in ("tar", "auto")):
                out.append((name, path))
    if d.exclude and not os.path.isfile(d.exclude):
        out.append(("data.exclude", d.exclude))
    return out


def validate_run(cfg: Config, world_size: int, cuda: bool | None, local_files: bool = True,
                 section: str = "train") -> BatchPlan:
    """Checks that need the world size, the device or the files; call before building anything.

    ``cuda=None``: the ranks' device is not known here (a login node, a batch shell): the device checks are left to
    the ranks. ``local_files=False`` (a node that does not mount the data): missing paths are left to
    :func:`missing_paths` for a warning instead of failing here.
    """
    plan = batch_plan(cfg, world_size, section)
    if cuda is not None:
        _check_device(cfg, cuda)
    if cfg.distributed.zero_stage != 0:
        raise ConfigError(
            f"config field 'distributed.zero_stage': {cfg.distributed.zero_stage} is refused: ZeRO shards flattened "
            "parameters, which breaks LARS's per-layer trust ratios; use 0")
    warmup = "optim.warmup_epochs" if section == "train" else f"{section}.warmup_epochs"
    lengths = cfg.optim if section == "train" else getattr(cfg, section)  # where the stage's warm-up is
    if cfg.train.time_budget_minutes and lengths.warmup_epochs <= 0:
        raise ConfigError("config field 'train.time_budget_minutes': the run measures its speed during the warm-up, "
                          f"while the LR does not yet depend on the run's length; set {warmup} > 0")
    if bool(cfg.model.momentum) != bool(cfg.loss.memory_size):
        raise ConfigError("config field 'loss.memory_size': SimCLR v2's memory needs both a momentum encoder "
                          f"(model.momentum={cfg.model.momentum}) and a queue (loss.memory_size={cfg.loss.memory_size}); "
                          "set both (e.g. 0.999 and 65536) or neither")
    gs = cfg.distributed.bn_group_size
    if gs:
        _check(world_size % gs == 0, "distributed.bn_group_size", f"{gs} does not divide the world size {world_size}")
    if cfg.data.dataset != "digits" and not cfg.data.eval_path:
        raise ConfigError("config field 'data.eval_path': the final kNN / linear-probe evaluation needs a held-out "
                          f"labelled split of the same kind as data.path ('{cfg.data.dataset}')")
    if local_files:
        for name, path in missing_paths(cfg):
            raise FileNotFoundError(f"config field '{name}': '{path}' does not exist")
    return plan


def _check_device(cfg: Config, cuda: bool) -> None:
    if precision_name(cfg, cuda) == "fp16" and not cuda:
        raise ConfigError("config field 'precision.dtype': fp16 needs a CUDA GPU (DeepSpeed refuses it on CPU); use bf16")
    if cfg.loss.impl == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("config field 'loss.impl': 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1); use auto or tiled")
    if cfg.distributed.backend == "nccl" and not cuda:
        raise ConfigError("config field 'distributed.backend': nccl needs CUDA; use auto or gloo")
    if cfg.distributed.backend == "gloo" and cuda:
        raise ConfigError("config field 'distributed.backend': gloo cannot carry the CUDA tensors of a GPU run "
                          "(its collectives refuse them); use auto or nccl")


def check_dataset_fits(plan: BatchPlan, batches_per_epoch: int, num_samples: int, section: str = "train") -> int:
    """Optimizer steps per epoch; fails naming the batch field when the dataset holds less than one step."""
    steps = batches_per_epoch // plan.accumulation
    _check(steps >= 1, f"{section}.global_batch_size",
           f"{plan.global_batch} is larger than the dataset's {num_samples} samples; lower it")
    return steps


def check_resume_compatible(saved: dict, cfg: Config, where: str) -> None:
    """The checkpoint's model section must equal this run's: another architecture cannot load its tensors."""
    from .load import to_dict

    runtime_only = ("compile", "compile_mode")  # how the network runs, not what its tensors are
    saved_model, current = saved.get("model"), to_dict(cfg)["model"]
    if saved_model is not None:
        # A field the checkpoint predates was at its default then (new options start switched off).
        defaults = to_dict(type(cfg)())["model"]
        saved_model = {k: saved_model.get(k, defaults[k]) for k in current if k not in runtime_only}
    current = {k: v for k, v in current.items() if k not in runtime_only}
    if saved_model is None or saved_model == current:
        return
    key = sorted(k for k in current if saved_model.get(k) != current[k])[0]
    raise ConfigError(f"config field 'model.{key}': the checkpoint in {where} was trained with {key}="
                      f"{saved_model.get(key)!r}, this run has {current[key]!r}; use the same model settings, "
                      "another checkpoint.dir, or checkpoint.resume=none")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles: where oneDNN runs bf16 convolutions natively instead of emulating them."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def precision_name(cfg: Config, cuda: bool | None = None) -> str:
    """'bf16', 'fp16' or 'fp32': ``precision.dtype`` with 'auto' resolved for this machine (see its doc)."""
    import torch

    if cfg.precision.dtype != "auto":
        return cfg.precision.dtype
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast_dtype(cfg: Config):
    """The torch dtype autocast runs in, or None for fp32 (autocast off)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision_name(cfg)]


def deepspeed_config(cfg: Config, plan: BatchPlan) -> dict:
    """The DeepSpeed config derived from ours. Precision is autocast (BN stays fp32), not DeepSpeed's bf16/fp16 modes
    that cast the whole module. The trainer marks the accumulation boundary itself
    (``engine.set_gradient_accumulation_boundary``), so one optimizer step is one ``engine.step()`` call."""
    ds: dict = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "gradient_clipping": 0.0,
        # DeepSpeed's throughput timer synchronizes the device twice per micro-step (engine.py, forward prologue
        # and step); the trainer's own phase timers replace it, and only when asked for.
        "timers": {"throughput": {"enabled": cfg.logging.timers, "synchronized": cfg.logging.timers}},
    }
    dtype = precision_name(cfg)
    if dtype != "fp32":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if dtype == "bf16" else "float16"}
    return ds
