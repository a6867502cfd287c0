"""The supervised stages after pretraining as stages of the trainer — ``fastclr linear``, ``finetune`` and
``distill``: one augmented view per image with its label (:mod:`fastclr.data.labelled`), the network the command
built (a classifier on the pretrained encoder, or a student), LARS or Nesterov SGD from the stage's section, and the
command's loss (cross-entropy on labels, or distillation against a teacher). The batch, length and LR come from the
stage's own section (``linear.*``, ``finetune.*``, ``distill.*``); checkpoints, resume, signals, time limits and
budgets from ``train.*`` and ``checkpoint.*`` as in pretraining.

Evaluation runs on every rank over its shard of the held-out split (centre crops), and the counts are summed over
the ranks: top-1 and top-5, the same on every rank.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F

log = logging.getLogger(__name__)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the samples with a label (>= 0); 0 for a batch without any — on the device (no
    host sync), where ``F.cross_entropy(ignore_index=-1)`` would give NaN."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp_min(1)


class LossOf:
    """A supervised objective: ``loss_fn(engine, images, labels)`` (a 0-d tensor) under the 'forward' timer; no
    state of its own across steps."""

    def __init__(self, engine, loss_fn):
        self.engine, self.loss_fn = engine, loss_fn

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, timer) -> torch.Tensor:
        with timer.phase("forward"):
            return self.loss_fn(self.engine, images, labels)

    def end_step(self, step: int, total_steps: int) -> None:
        """Nothing follows a supervised step (no queue, no momentum encoder)."""

    def resume(self, step: int, plan) -> None:
        """Nothing to restore: the loss keeps no state across steps."""


class Supervised:
    """Stage ``name`` ('linear', 'finetune' or 'distill') training ``model`` on ``source`` (the data) with
    ``loss_fn``; outputs (metrics, config, checkpoints by default) in ``out_dir``; ``origin``: the weights it
    started from (a checkpoint, backbone or teacher, with ``random-init`` for the baseline)."""

    monitor_every_epochs, final_evaluations = 0, 1

    def __init__(self, cfg, name: str, model: torch.nn.Module, source, loss_fn, out_dir: str, origin: str = "",
                 held_out=None):
        self.cfg, self.name, self.section = cfg, name, name
        self.identity = {"source": origin}  # kept in every checkpoint: resuming from another source is refused
        self.task = getattr(cfg, name)
        self.model, self.source, self.loss_fn, self.out_dir = model, source, loss_fn, out_dir
        self.log_every = self.task.log_every
        self._test = held_out  # the held-out loader, when the command already built one (distill: the teacher's)

    def train_loader(self, rt, plan, dtype):
        from ..data.labelled import build_labelled_loader

        return build_labelled_loader(self.cfg.data, self.source, crop_area=self.task.crop_area,
                                     batch_size=plan.micro_batch, shard_id=rt.rank, num_shards=rt.world_size,
                                     device=rt.device, dtype=dtype, channels_last=self.cfg.precision.channels_last,
                                     batch_field=f"{self.name}.global_batch_size")

    def schedule(self, steps_per_epoch: int, global_batch: int):
        from ..optim import Schedule

        t = self.task
        return Schedule.in_epochs(t.epochs, t.warmup_epochs, t.base_lr, t.lr_scaling, 0.0, steps_per_epoch,
                                  global_batch)

    def network(self, rt) -> torch.nn.Module:
        return self.model

    def optimizer(self, model, lr: float):
        from ..engine import build_optimizer

        t = self.task
        return build_optimizer(model, t.optimizer, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay,
                               trust_coefficient=self.cfg.optim.trust_coefficient)

    def objective(self, engine, rt, dtype):
        return LossOf(engine, self.loss_fn)

    def record_length(self, epochs: float, warmup_epochs: float) -> None:
        self.task.epochs, self.task.warmup_epochs = epochs, warmup_epochs
        self.cfg.train.time_budget_minutes = 0.0

    def describe(self, trainer) -> str:
        cfg, plan, rt = self.cfg, trainer.plan, trainer.rt
        return (f"{self.name}: {cfg.model.arch} x{cfg.model.width_mult:g}, {trainer.loader.num_samples} training "
                f"images, {rt.world_size} rank(s) on {rt.device.type}, global batch {plan.global_batch} = "
                f"{plan.micro_batch} x {plan.accumulation} x {plan.world_size}, {trainer.total_steps} steps "
                f"({trainer.steps_per_epoch}/epoch), {self.task.optimizer} peak LR {trainer.schedule.peak_lr:.3g}; "
                f"output in {self.out_dir}, checkpoints in {cfg.checkpoint.dir}")

    def test_loader(self, rt):
        if self._test is None:
            self._test = held_out_loader(self.cfg, rt)
        return self._test

    def evaluate(self, trainer, kind: str) -> dict:
        from ..config import autocast_dtype

        return evaluate(trainer.model, self.test_loader(trainer.rt), trainer.rt.device, autocast_dtype(self.cfg))

    def finish(self, trainer, results: dict, elapsed: float, steps: int, stop: str | None) -> None:
        from ..plots import plot_run

        results["train_minutes"] = elapsed / 60
        plots = plot_run(self.out_dir)
        log.info(f"{steps} steps in {elapsed / 60:.1f} min" + (f" — stopped early ({stop})" if stop else "") +
                 f"; metrics/plots in {self.out_dir} ({', '.join(p.rsplit('/', 1)[-1] for p in plots)})")


def held_out_loader(cfg, rt, batch_size: int = 256):
    """The held-out split, centre crops, this rank's shard (every image: the figure is the whole split's)."""
    from ..config import autocast_dtype
    from ..data import build_eval_loader

    return build_eval_loader(cfg.data, "test", batch_size=batch_size, device=rt.device,
                             dtype=autocast_dtype(cfg) or torch.float32, channels_last=cfg.precision.channels_last,
                             shard_id=rt.rank, num_shards=rt.world_size)


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
