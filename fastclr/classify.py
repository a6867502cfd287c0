"""The supervised step and loop shared by ``fastclr linear``, ``finetune`` and ``distill``, data-parallel on DeepSpeed as
pretraining is: the network as ``engine.module`` with LARS or Nesterov SGD as the client optimizer (weight decay and
LARS adaptation on weights only, :func:`fastclr.optim.param_groups`), autocast from the DeepSpeed config (bf16 on CPU
and GPU, BN in fp32), channels_last, gradients all-reduced in buckets as backward produces them, the LR a pure
function of the step (warm-up then cosine, :class:`fastclr.optim.Schedule`). The loss comes from the command:
cross-entropy on labels, or the distillation loss against a teacher.

Evaluation runs on every rank over its shard of the held-out split (centre crops), and the counts are summed over
the ranks: top-1 and top-5, the same on every rank.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .allreduce import GradientBuckets
from .config import BatchPlan, ConfigError, autocast_dtype, deepspeed_config
from .config.checks import _check
from .metrics import LogWindow, MetricsLogger, Progress
from .optim import LARS, Schedule, param_groups, peak_lr

log = logging.getLogger(__name__)


def task_plan(task, name: str, world_size: int) -> BatchPlan:
    """global = micro × accumulation × world for a task section (``name``: 'linear', 'finetune', 'distill')."""
    g = task.global_batch_size
    _check(g % world_size == 0, f"{name}.global_batch_size",
           f"{g} is not divisible by the world size {world_size}; use a multiple of {world_size}")
    micro = task.micro_batch_size or g // world_size
    _check(g % (micro * world_size) == 0, f"{name}.micro_batch_size",
           f"global batch {g} is not divisible by micro batch {micro} × world size {world_size}")
    return BatchPlan(g, micro, g // (micro * world_size), world_size)


def task_schedule(task, steps_per_epoch: int, global_batch: int) -> Schedule:
    total = max(1, round(task.epochs * steps_per_epoch))
    return Schedule(total_steps=total, warmup_steps=min(total - 1, round(task.warmup_epochs * steps_per_epoch)),
                    peak_lr=peak_lr(task.base_lr, global_batch, task.lr_scaling), final_lr=0.0)


def build_optimizer(model: torch.nn.Module, task, lr: float, trust_coefficient: float):
    """LARS (momentum, trust ratio on weights) or Nesterov-momentum SGD (the reference's ``--optimizer=momentum``),
    over the trainable parameters, weight decay on weights only."""
    groups = param_groups(model, task.weight_decay)
    if not groups:
        raise ValueError("the network has no trainable parameters")
    if task.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=task.momentum, trust_coefficient=trust_coefficient)
    return torch.optim.SGD(groups, lr=lr, momentum=task.momentum, nesterov=True)


def build_engine(cfg, task, rt, plan: BatchPlan, model: torch.nn.Module, lr: float):
    """(DeepSpeed engine, optimizer, GradientBuckets) for ``model`` (built with the right norm layer and loaded)."""
    import deepspeed

    optimizer = build_optimizer(model, task, lr, cfg.optim.trust_coefficient)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, plan))
    engine.enable_backward_allreduce = False  # the buckets all-reduce, overlapped with backward
    if cfg.precision.channels_last:
        engine.module.to(memory_format=torch.channels_last)  # after initialize: its broadcast needs contiguous data
    grads = GradientBuckets(engine.module.parameters(), rt.world_size, cfg.distributed.bucket_mb,
                            first_bucket_mb=cfg.distributed.first_bucket_mb,
                            overlap=cfg.distributed.overlap_comm)
    if isinstance(optimizer, LARS):
        optimizer.grad_buffers = grads.flat
    return engine, optimizer, grads


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the samples with a label (>= 0); 0 for a batch without any — on the device (no
    host sync), where ``F.cross_entropy(ignore_index=-1)`` would give NaN."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp_min(1)


class SupervisedRun:
    """The loop of one supervised task: ``run()`` trains ``schedule.total_steps`` steps over ``loader`` and returns
    the test figures. ``loss_fn(engine, images, labels) -> loss`` (a 0-d tensor) defines the task."""

    def __init__(self, cfg, task, name: str, rt, plan: BatchPlan, model: torch.nn.Module, loader, test_loader,
                 loss_fn, out_dir: str):
        self.cfg, self.task, self.name, self.rt, self.plan = cfg, task, name, rt, plan
        self.loader, self.test_loader, self.loss_fn, self.out_dir = loader, test_loader, loss_fn, out_dir
        self.steps_per_epoch = len(loader) // plan.accumulation
        if self.steps_per_epoch < 1:
            raise ConfigError(f"config field '{name}.global_batch_size': {plan.global_batch} is larger than the "
                              f"{loader.num_samples} training samples; lower it")
        self.schedule = task_schedule(task, self.steps_per_epoch, plan.global_batch)
        self.engine, self.optimizer, self.grads = build_engine(cfg, task, rt, plan, model, self.schedule.peak_lr)
        self.model = self.engine.module
        self.dtype = autocast_dtype(cfg)
        self.metrics = MetricsLogger(out_dir, enabled=rt.is_main, tensorboard=cfg.logging.tensorboard)
        self.window = LogWindow(rt.device)
        self.step = 0

    def train_step(self, micro_batches) -> torch.Tensor:
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.grads.prepare()
        loss_sum = 0.0
        for i, (images, labels) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            self.engine.set_gradient_accumulation_boundary(last)
            if last:
                self.grads.arm()
            loss = self.loss_fn(self.engine, images, labels)
            self.engine.backward(loss)  # scaled by 1/accumulation
            loss_sum = loss_sum + loss.detach()
        self.grads.finish()
        self.engine.step()
        self.step += 1
        return loss_sum / len(micro_batches)

    def run(self) -> dict:
        total, accumulation = self.schedule.total_steps, self.plan.accumulation
        progress = Progress(total, enabled=self.rt.is_main and self.cfg.logging.progress)
        progress.start(0)
        t0 = time.monotonic()
        self.window.reset(0)
        while self.step < total:
            epoch = self.step // self.steps_per_epoch
            self.loader.set_epoch(epoch)
            batches = iter(self.loader)
            for _ in range(self.steps_per_epoch):
                if self.step >= total:
                    break
                self.window.add(self.train_step([next(batches) for _ in range(accumulation)]))
                postfix = None
                if self.step % self.task.log_every == 0 or self.step == total:
                    loss, ips = self.window.pop(self.step, self.plan.global_batch)  # host sync: log steps only
                    self.metrics.log("train", self.step, {"loss": loss, "lr": self.schedule(self.step - 1),
                                                          "images_per_s": ips,
                                                          "epoch": self.step / self.steps_per_epoch})
                    postfix = f"loss {loss:.4f} {ips:.0f} img/s"
                progress.update(1, postfix)
        progress.close()
        results = evaluate(self.model, self.test_loader, self.rt.device, self.dtype)
        results["train_minutes"] = (time.monotonic() - t0) / 60
        self.metrics.log("eval", self.step, {"epoch": self.step / self.steps_per_epoch, **results})
        self.metrics.close()
        return results


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, dtype=None) -> dict:
    """{'top1', 'top5' (%), 'test_images'} of ``model``'s logits over a (sharded) labelled split, in eval mode;
    collective: the counts are summed over the ranks, so every rank returns the same figures."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct top-1, correct top-5, images
    try:
        for images, labels in loader:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(images)  # (B, C)
            keep = labels >= 0  # bad images are labelled -1 by the evaluation loader
            top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
            hit = (top == labels[:, None]) & keep[:, None]
            counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), keep.sum()]).to(counts.dtype)
    finally:
        model.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    top1, top5, n = counts.tolist()
    if n == 0:
        raise ValueError("the evaluation split holds no labelled image")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "test_images": int(n)}

