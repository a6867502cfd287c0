"""The network on DeepSpeed, ready to step: SimCLR model, LARS as the client optimizer, channels_last parameters,
torch.compile, and the gradient buckets whose all-reduce overlaps backward."""
from __future__ import annotations

import logging

import torch

from .allreduce import GradientBuckets
from .config import BatchPlan, Config, deepspeed_config
from .models import build_model
from .models.momentum import MomentumMemory
from .optim import LARS, param_groups
from .runtime import Runtime


def norm_layer(cfg: Config, world_size: int):
    """BN over all ranks (or groups of ``bn_group_size``); None (ATen's batch norm) for the statistics of one."""
    size = cfg.distributed.bn_group_size or world_size
    if not cfg.distributed.global_bn or size == 1:
        return None
    from .distributed import global_bn_layer

    return global_bn_layer(size)


def build_engine(cfg: Config, rt: Runtime, plan: BatchPlan, peak_lr: float):
    """(DeepSpeed engine, LARS, GradientBuckets) of a run; the model is ``engine.module``."""
    import deepspeed

    norm = norm_layer(cfg, rt.world_size)
    model = build_model(cfg.model, norm_layer=norm)
    if cfg.model.momentum:  # SimCLR v2's memory: a momentum encoder (a second copy) and its queue of keys
        model.memory = MomentumMemory(model, build_model(cfg.model, norm_layer=norm), cfg.loss.memory_size,
                                      cfg.model.proj_out_dim)
    lars = LARS(param_groups(model, cfg.optim.weight_decay), lr=peak_lr, momentum=cfg.optim.momentum,
                trust_coefficient=cfg.optim.trust_coefficient)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=lars, config=deepspeed_config(cfg, plan))
    engine.enable_backward_allreduce = False  # the all-reduce is the buckets', overlapped with backward
    if cfg.precision.channels_last:
        # After initialize: DeepSpeed broadcasts rank 0's parameters as byte views, which needs contiguous tensors.
        # ``.to(memory_format=...)`` swaps each parameter's data in place, so the optimizer and engine keep valid
        # references.
        engine.module.to(memory_format=torch.channels_last)
    if cfg.model.compile == "true" or (cfg.model.compile == "auto" and rt.cuda):
        engine.module.compile(mode=cfg.model.compile_mode)  # in place: parameter names and checkpoints unchanged
    # After the layout change: the gradient views take each parameter's strides.
    grads = GradientBuckets(engine.module.parameters(), rt.world_size, cfg.distributed.bucket_mb,
                            first_bucket_mb=cfg.distributed.first_bucket_mb,
                            overlap=cfg.distributed.overlap_comm)
    optimizer.grad_buffers = grads.flat
    return engine, optimizer, grads
