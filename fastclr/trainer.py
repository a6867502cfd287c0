"""SimCLR pretraining on DeepSpeed: the optimizer step and the loop around it.

One step (``train_step``): for each accumulation micro-batch, two views of B images → one forward over the 2B batch
(BN statistics over both views, as in the reference implementation) → NT-Xent against every rank's embeddings →
backward; then the gradient all-reduce, the non-finite decision and LARS with the LR a pure function of the step.
Precision is autocast (bf16, or fp16 with loss scaling on GPU); parameters, BN statistics and LARS state are fp32.
Activations are channels_last from the data pipeline on.

The loop (``train``): resume → steps, with logging, checkpoints, evaluation and the all-rank stop decision at their
cadences → final checkpoint → evaluation. Everything else lives in the module named for it: checkpoint (run state,
resume), preemption (signals, stop agreement, requeue), report (bad images, summary, plots), eval, optim.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from . import checkpoint, losses
from .checkpoint import RunState
from .config import BatchPlan, Config, autocast_dtype, check_dataset_fits, deepspeed_config, save_config
from .eval import evaluate_run
from .metrics import LogWindow, MetricsLogger, PhaseTimer, Progress
from .optim import LARS, NonfiniteGuard, Schedule, param_groups
from .preemption import StopPolicy
from .report import BadSampleReport, plot_run, summarize
from .runtime import Runtime

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config, rt: Runtime, plan: BatchPlan):
        import deepspeed

        from .data import build_train_loader
        from .models import build_model

        self.cfg, self.rt, self.plan = cfg, rt, plan
        self.batch_dtype = autocast_dtype(cfg) or torch.float32
        torch.manual_seed(cfg.seed)
        self.loader = build_train_loader(cfg.data, batch_size=plan.micro_batch, shard_id=rt.rank,
                                         num_shards=rt.world_size, device=rt.device, dtype=self.batch_dtype,
                                         channels_last=cfg.precision.channels_last)
        self.steps_per_epoch = check_dataset_fits(plan, len(self.loader), self.loader.num_samples)
        self.schedule = Schedule.of(cfg, self.steps_per_epoch, plan.global_batch)

        model = build_model(cfg.model, norm_layer=self.norm_layer())
        lars = LARS(param_groups(model, cfg.optim.weight_decay), lr=self.schedule.peak_lr,
                    momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.trust_coefficient)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=lars,
                                                                 config=deepspeed_config(cfg, plan))
        self.model = self.engine.module
        # The gradient all-reduce is called by train_step (not inside backward) so that it can be timed on its own.
        self.engine.enable_backward_allreduce = False
        if cfg.precision.channels_last:
            # After initialize: DeepSpeed broadcasts rank 0's parameters as byte views, which needs contiguous
            # tensors. ``.to(memory_format=...)`` swaps each parameter's data in place, so the optimizer and engine
            # keep valid references.
            self.model.to(memory_format=torch.channels_last)
        self.loss_group = "world" if (cfg.loss.global_negatives and rt.world_size > 1) else None

        self.state = RunState()
        self.guard = NonfiniteGuard(cfg.train.max_nonfinite_steps, cfg.checkpoint.dir)
        self.timer = PhaseTimer(cfg.logging.timers, rt.device)
        self.window = LogWindow(rt.device)
        self.metrics = MetricsLogger(cfg.logging.dir, enabled=rt.is_main, tensorboard=cfg.logging.tensorboard)
        self.progress = Progress(self.schedule.total_steps, enabled=rt.is_main and cfg.logging.progress)
        self.stop = StopPolicy(max_minutes=cfg.train.max_minutes, stop_at_step=cfg.train.stop_at_step,
                               world_size=rt.world_size, cuda=rt.cuda)
        self.report_bad = BadSampleReport(self.loader.bad, cfg.logging.dir, rt.rank)
        self._batches = None  # the loader's iterator over the current epoch
        self._saved_at = -1   # step of the newest checkpoint this process wrote or resumed from

    step = property(lambda self: self.state.step, doc="Optimizer steps taken.")
    epoch = property(lambda self: self.state.step // self.steps_per_epoch, doc="Epochs completed.")
    total_steps = property(lambda self: self.schedule.total_steps, doc="Steps of the whole schedule.")

    def norm_layer(self):
        """BN over all ranks (or groups of ``bn_group_size``); None (ATen's batch norm) for the statistics of one."""
        size = self.cfg.distributed.bn_group_size or self.rt.world_size
        if not self.cfg.distributed.global_bn or size == 1:
            return None
        from .distributed import global_bn_layer

        return global_bn_layer(size)

    # ------------------------------------------------------------------------------------------------------------ #
    def next_micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The accumulation micro-batches of the step about to run. Epoch e holds steps e·S … e·S+S−1 (S steps per
        epoch); at its end the loader moves to the next epoch (a tail of fewer than ``accumulation`` batches is
        dropped), so the batches are a pure function of the step and resume lands on exactly the same ones."""
        epoch = self.state.step // self.steps_per_epoch
        if self.loader.epoch != epoch:
            self.loader.set_epoch(epoch)
            self._batches = None
        if self._batches is None:
            self._batches = iter(self.loader)
        with self.timer.phase("data"):
            return [next(self._batches) for _ in range(self.plan.accumulation)]

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over its micro-batches; returns the step's mean loss (a device tensor: no host sync)."""
        timer, cfg = self.timer, self.cfg
        lr = self.schedule(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for i, (view_a, view_b) in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            with timer.phase("forward"):
                z = self.engine(torch.cat([view_a, view_b]))  # (2B, d); channels_last kept by cat; engine autocasts
            with timer.phase("loss"):
                z_a, z_b = z.chunk(2)
                loss = losses.nt_xent(z_a, z_b, temperature=cfg.loss.temperature, impl=cfg.loss.impl,
                                      group=self.loss_group)
            with timer.phase("backward"):
                self.engine.backward(loss)  # scaled by 1/accumulation: the step's gradient is the micro-batch mean
            loss_sum = loss_sum + loss.detach()
        if timer.enabled and self.rt.world_size > 1:
            # Timers only: a barrier first, so that waiting for the slowest rank (imbalance, stragglers) is billed to
            # 'wait' and 'comm' holds the all-reduce alone.
            with timer.phase("wait"):
                torch.distributed.barrier()
        with timer.phase("comm"):
            self.engine.allreduce_gradients()
        with timer.phase("optimizer"):
            scaler = self.engine.torch_autocast_z0_gradscaler
            if scaler is None:
                self.state.nonfinite_steps += self.guard.skip(list(self.model.parameters()), self.state.step,
                                                              self.state.nonfinite_steps)
                self.engine.step()
            else:  # fp16: the scaler skips overflowing steps and halves its scale; count them from the scale
                scale = scaler.get_scale()
                self.engine.step()
                self.state.nonfinite_steps += int(scaler.get_scale() < scale)
        self.state.step += 1
        return loss_sum / len(micro_batches)

    # ------------------------------------------------------------------------------------------------------------ #
    def train(self) -> dict:
        """Train to the end (or to a stop request), checkpoint, evaluate. The result has ``stop_reason``: None for a
        finished run, else 'signal' (preempted: checkpoint written, no evaluation), 'deadline' or 'stop_at_step'."""
        cfg, rt, plan = self.cfg, self.rt, self.plan
        self.resume()
        start_step, t_start = self.state.step, time.monotonic()
        if rt.is_main:
            save_config(cfg, os.path.join(cfg.logging.dir, "config.yaml"), "The resolved config of this run: a recipe "
                        "(fastclr pretrain --config <this file>).")
            log.info(f"{cfg.model.arch} x{cfg.model.width_mult:g} on {cfg.data.dataset}, {rt.world_size} rank(s) on "
                     f"{rt.device.type}, global batch {plan.global_batch} = {plan.micro_batch} x {plan.accumulation} x "
                     f"{rt.world_size}, {self.total_steps} steps ({self.steps_per_epoch}/epoch), peak LR "
                     f"{self.schedule.peak_lr:.3g}, loss impl {cfg.loss.impl}")
        self.stop.start_clock()
        self.progress.start(start_step)
        self.window.reset(start_step)
        reason = None
        with self.stop.signals:
            while reason is None and self.state.step < self.total_steps:
                self.window.add(self.train_step(self.next_micro_batches()))
                reason = self.after_step()
        self.progress.close()
        self.report_bad()
        self.save()
        if reason == "signal":
            log.info(f"signal {self.stop.signals.received} received: checkpoint at step {self.state.step} written, "
                     "exiting for requeue")
            return {"stop_reason": reason}
        results = self.evaluate(with_baseline=cfg.eval.baseline)
        if rt.is_main:
            self.finish(results, time.monotonic() - t_start, self.state.step - start_step, reason)
        return {"stop_reason": reason, "bad_samples": len(self.loader.bad.bad), **results}

    def after_step(self) -> str | None:
        """Log, checkpoint and evaluate where the step just taken calls for it; then the all-rank stop decision."""
        cfg, step = self.cfg, self.state.step
        last = step >= self.total_steps
        postfix = None
        if step % cfg.train.log_every == 0 or last:
            postfix = self.log_train()
            self.report_bad()
        self.progress.update(1, postfix)
        # No checkpoint in the middle of a non-finite streak: the batch that overflowed also went through BN's
        # running statistics; the previous checkpoint stays the newest until a good step follows.
        calm = self.guard.in_row == 0
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and calm:
            self.save()
        if last:
            return None
        if step % self.steps_per_epoch == 0:
            epoch = step // self.steps_per_epoch
            if cfg.checkpoint.every_epochs and epoch % cfg.checkpoint.every_epochs == 0 and calm:
                self.save()
            if cfg.eval.every_epochs and epoch % cfg.eval.every_epochs == 0:
                self.evaluate(with_baseline=False, probe=False)
        return self.stop.reason(step)

    def log_train(self) -> str:
        step, window_steps = self.state.step, self.state.step - self.window.first_step
        loss, ips = self.window.pop(step, self.plan.global_batch)  # host sync: only at log steps
        lr = self.schedule(step - 1)
        scaler = self.engine.torch_autocast_z0_gradscaler
        extra = {"loss_scale": scaler.get_scale()} if scaler is not None else {}
        self.metrics.log("train", step, {"loss": loss, "lr": lr, "images_per_s": ips, **extra,
                                         "nonfinite_steps": self.state.nonfinite_steps,
                                         "bad_samples": len(self.loader.bad.bad),
                                         "images_per_s_per_device": ips / self.rt.world_size,
                                         "epoch": step / self.steps_per_epoch,
                                         **self.timer.pop_ms_per_step(window_steps)})
        return f"loss {loss:.4f} lr {lr:.3g} {ips:.0f} img/s"

    def evaluate(self, with_baseline: bool, probe: bool = True) -> dict:
        results = evaluate_run(self.cfg, self.model, self.rt, with_baseline=with_baseline, probe=probe)
        self.metrics.log("eval", self.state.step, {"epoch": self.state.step // self.steps_per_epoch, **results})
        return results

    # ------------------------------------------------------------------------------------------------------------ #
    def save(self) -> None:
        if self._saved_at == self.state.step:
            return  # this step's checkpoint exists already
        rank_state = {"loader": self.loader.state_dict(), "rng": checkpoint.rng_state()}
        checkpoint.save(self.engine, self.cfg.checkpoint.dir, self.state.step,
                        self.state.to_client(self.cfg, self.rt.world_size, self.steps_per_epoch), rank_state,
                        self.rt.rank, self.cfg.checkpoint.keep)
        self._saved_at = self.state.step

    def resume(self) -> bool:
        """Continue from ``checkpoint.resume``'s choice; False when there is nothing to resume."""
        state = checkpoint.restore(self.engine, self.loader, self.cfg, self.rt.world_size, self.rt.rank)
        if state is None:
            return False
        self.state, self._saved_at = state, state.step
        return True

    def finish(self, results: dict, elapsed: float, steps: int, stop: str | None) -> None:
        from .models.export import save_backbone

        run_dir = self.cfg.logging.dir
        backbone = save_backbone(self.model, os.path.join(run_dir, "backbone.pt"))
        self.metrics.close()
        summarize(steps=steps, elapsed_s=elapsed, images_per_step=self.plan.global_batch, stop=stop,
                  ckpt_dir=self.cfg.checkpoint.dir, run_dir=run_dir, plots=plot_run(run_dir), backbone=backbone,
                  results=results)

    def close(self) -> None:
        self.metrics.close()
