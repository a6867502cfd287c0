"""A network on DeepSpeed, ready to step — the one engine of every stage (pretraining, linear, finetune, distill):
the client optimizer (LARS or Nesterov SGD, both skipping a non-finite step on the device), channels_last
parameters, torch.compile (by region where the all-reduce overlaps backward), and the gradient buckets whose
all-reduce overlaps backward. The norm layer (global BN or not) is chosen here too."""
from __future__ import annotations

import logging
import types

import torch

from .allreduce import GradientBuckets
from .config import BatchPlan, Config, deepspeed_config
from .models import build_model
from .models.heads import ProjectionHead
from .models.resnet import BasicBlock, Bottleneck, ResNet
from .models.momentum import MomentumMemory
from .optim import LARS, NesterovSGD, param_groups
from .runtime import Runtime


def norm_layer(cfg: Config, world_size: int):
    """BN over all ranks (or groups of ``bn_group_size``); None (ATen's batch norm) for the statistics of one."""
    size = cfg.distributed.bn_group_size or world_size
    if not cfg.distributed.global_bn or size == 1:
        return None
    from .distributed import global_bn_layer

    return global_bn_layer(size)


def compile_regions(model: torch.nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` every residual block and the projection head, each in place; returns how many.

    Not the whole network: a compiled graph's backward is one autograd node, and the gradient hooks of its parameters
    (``GradientBuckets._ready``, which starts each bucket's all-reduce) fire only once that node has returned. One
    graph for the network would hold every all-reduce back to the end of backward, so nothing overlaps; a graph per
    block releases each block's gradients as soon as its backward is done, while the blocks below still run.
    Measured with ``python -m benchmarks.overlap`` (aot_eager on the CPU; the hooks of the first bucket to fill,
    the head's and the last blocks'): whole-network compile makes that bucket ready 0.9 ms (1%) before backward ends,
    per-region compile 102 ms (89%; eager 98%). Blocks of one shape share a compiled graph (parameters are graph
    inputs). The stem is compiled as one more region. The price, on the CPU at least (inductor, bf16, ResNet-18
    32 px b256, one run): the per-region step ran 0.79-0.81x eager where the whole-network one ran 1.13-1.16x,
    which is why one rank, with no all-reduce to hide, compiles the whole network (:func:`compile_network`).
    """
    # Each distinct block shape (a stage's first block and the rest, at training and evaluation batch sizes) is one
    # more graph of the same code object; Dynamo's default of 8 would fall back to eager for the later stages.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Static shapes: blocks of the same code but other shapes (every stage) would otherwise turn Dynamo's automatic
    # dynamic shapes on after the second one, and every later graph would be a generic, symbolic-size one.
    compile_kwargs.setdefault("dynamic", False)
    regions = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck, ProjectionHead))]
    for m in regions:
        m.compile(**compile_kwargs)
    stems = [m for m in model.modules() if isinstance(m, ResNet)]
    if stems:
        # The stem's conv, norm and ReLU run at the full input resolution: as costly as a block, and its parameters'
        # gradients come last anyway. Compiled as a method, so its modules keep their names (conv1, bn1); bound
        # with MethodType, so a deep copy of the network binds the copy's stem, not this one.
        stem = torch.compile(ResNet.stem, **compile_kwargs)
        for m in stems:
            m.stem = types.MethodType(stem, m)
    return len(regions) + len(stems)


def compile_network(model: torch.nn.Module, world_size: int, overlap: bool, **compile_kwargs) -> str:
    """``torch.compile`` in place (parameter names and checkpoints unchanged); returns 'regions' or 'whole'.

    Several ranks overlapping their all-reduce: per region (:func:`compile_regions`), so that gradients leave each
    block as its backward ends. One rank has nothing to overlap: one graph, which fuses across the blocks (the
    ResNet-18 CPU step: whole 1.13-1.16x eager, per region 0.79-0.81x; bf16, inductor, same run).
    """
    if world_size > 1 and overlap:
        compile_regions(model, **compile_kwargs)
        return "regions"
    model.compile(**compile_kwargs)
    return "whole"


def build_optimizer(model: torch.nn.Module, kind: str, *, lr: float, momentum: float, weight_decay: float,
                    trust_coefficient: float = 0.001):
    """LARS (``kind='lars'``; trust ratio on weights) or Nesterov-momentum SGD (``'sgd'``, the reference's
    ``--optimizer=momentum``) over the trainable parameters, weight decay on weights only."""
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the network has no trainable parameters")
    if kind == "lars":
        return LARS(groups, lr=lr, momentum=momentum, trust_coefficient=trust_coefficient)
    return NesterovSGD(groups, lr=lr, momentum=momentum)


def simclr_network(cfg: Config, world_size: int) -> torch.nn.Module:
    """Pretraining's network: the SimCLR model of ``cfg.model`` (with SimCLR v2's momentum memory if configured)."""
    norm = norm_layer(cfg, world_size)
    model = build_model(cfg.model, norm_layer=norm)
    if cfg.model.momentum:  # SimCLR v2's memory: a momentum encoder (a second copy) and its queue of keys
        model.memory = MomentumMemory(model, build_model(cfg.model, norm_layer=norm), cfg.loss.memory_size,
                                      cfg.model.proj_out_dim)
    return model


def build_engine(cfg: Config, rt: Runtime, plan: BatchPlan, model: torch.nn.Module, optimizer):
    """(DeepSpeed engine, optimizer, GradientBuckets) of ``model`` stepped by ``optimizer`` (:func:`build_optimizer`);
    the model is ``engine.module``."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(cfg, plan))
    engine.enable_backward_allreduce = False  # the all-reduce is the buckets', overlapped with backward
    if cfg.precision.channels_last:
        # After initialize: DeepSpeed broadcasts rank 0's parameters as byte views, which needs contiguous tensors.
        # ``.to(memory_format=...)`` swaps each parameter's data in place, so the optimizer and engine keep valid
        # references.
        engine.module.to(memory_format=torch.channels_last)
    if cfg.model.compile == "true" or (cfg.model.compile == "auto" and rt.cuda):
        compile_network(engine.module, rt.world_size, cfg.distributed.overlap_comm, mode=cfg.model.compile_mode)
    # After the layout change: the gradient views take each parameter's strides.
    grads = GradientBuckets(engine.module.parameters(), rt.world_size,
                            cfg.distributed.bucket_mb, first_bucket_mb=cfg.distributed.first_bucket_mb,
                            overlap=cfg.distributed.overlap_comm)
    optimizer.grad_buffers = grads.flat
    return engine, optimizer, grads
