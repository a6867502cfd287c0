"""SimCLR pretraining as a stage of the trainer: two augmented views per image from the DALI loader, the SimCLR
network (with SimCLR v2's momentum memory if configured), LARS, NT-Xent (:class:`fastclr.objective.Objective`); kNN
monitors, the final kNN and linear probe (with the random-init baseline), the backbone export and the run summary."""
from __future__ import annotations

import os

from ..config import Config


class Pretraining:
    name, section = "pretrain", "train"
    identity: dict = {}  # nothing beyond the config ties a pretraining checkpoint to its start

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out_dir = cfg.logging.dir
        self.log_every = cfg.train.log_every
        self.monitor_every_epochs = cfg.eval.every_epochs
        self.final_evaluations = 2 if cfg.eval.baseline else 1  # the trained encoder, and the random-init one

    def train_loader(self, rt, plan, dtype):
        from ..data import build_train_loader

        return build_train_loader(self.cfg.data, batch_size=plan.micro_batch, shard_id=rt.rank,
                                  num_shards=rt.world_size, device=rt.device, dtype=dtype,
                                  channels_last=self.cfg.precision.channels_last)

    def schedule(self, steps_per_epoch: int, global_batch: int):
        from ..optim import Schedule

        return Schedule.of(self.cfg, steps_per_epoch, global_batch)

    def network(self, rt):
        from ..engine import simclr_network

        return simclr_network(self.cfg, rt.world_size)

    def optimizer(self, model, lr: float):
        from ..engine import build_optimizer

        o = self.cfg.optim
        return build_optimizer(model, "lars", lr=lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               trust_coefficient=o.trust_coefficient)

    def objective(self, engine, rt, dtype):
        from ..objective import Objective

        return Objective(self.cfg, engine, rt.world_size, dtype)

    def record_length(self, epochs: float, warmup_epochs: float) -> None:
        """A time budget's choice, kept in the config a run writes (config.yaml is then a recipe of this run)."""
        self.cfg.train.epochs, self.cfg.train.time_budget_minutes = epochs, 0.0
        self.cfg.optim.warmup_epochs = warmup_epochs

    def describe(self, trainer) -> str:
        from ..summary import describe_run

        return describe_run(self.cfg, trainer.plan, trainer.rt.device.type, trainer.total_steps,
                            trainer.steps_per_epoch, trainer.schedule.peak_lr)

    def evaluate(self, trainer, kind: str) -> dict:
        """'final': kNN and probe, with the random-init baseline if eval.baseline; 'monitor': kNN only; 'budget': kNN
        and probe (what the final evaluation costs, without the baseline)."""
        from ..eval import evaluate_run

        return evaluate_run(self.cfg, trainer.model, trainer.rt, with_baseline=kind == "final" and self.cfg.eval.baseline,
                            probe=kind != "monitor")

    def finish(self, trainer, results: dict, elapsed: float, steps: int, stop: str | None) -> None:
        from ..export import save_backbone
        from ..plots import plot_run
        from ..summary import summarize

        backbone = save_backbone(trainer.model, os.path.join(self.out_dir, "backbone.pt"))
        summarize(steps=steps, elapsed_s=elapsed, images_per_step=trainer.plan.global_batch, stop=stop,
                  ckpt_dir=self.cfg.checkpoint.dir, run_dir=self.out_dir, plots=plot_run(self.out_dir),
                  backbone=backbone, results=results)
