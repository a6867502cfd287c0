"""The step engine and loop of every stage — pretraining, linear evaluation, fine-tuning, distillation — on DeepSpeed.

A stage (:mod:`fastclr.stages`) brings its data, network, optimizer kind and objective; everything else is here and
the same for all. One step (``train_step``): for each accumulation micro-batch the objective's forward and loss, then
backward, whose last one all-reduces the gradients as they come; then the optimizer (LARS or Nesterov SGD, the LR a
pure function of the step), which skips a non-finite step on the device. No host sync anywhere in it
(tests/test_host_syncs.py). Precision is autocast (bf16, or fp16 with loss scaling on GPU); parameters, BN statistics
and optimizer state are fp32; activations are channels_last from the data pipeline on.

The loop (``train``): resume → steps, with logging, checkpoints, monitor evaluations and the all-rank stop decision
at their cadences → final checkpoint → the stage's evaluation and outputs. When to checkpoint is the
:class:`fastclr.cadence.Cadence`'s decision; whether to stop, :class:`fastclr.preemption.StopPolicy`'s vote.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from . import checkpoint
from .bad_images import BadSampleReport
from .budget import Planner, plan_length
from .cadence import Cadence
from .checkpoint import RunState
from .config import BatchPlan, Config, autocast_dtype, check_dataset_fits, save_config
from .engine import build_engine
from .metrics import MetricsLogger
from .optim import SkippedSteps
from .preemption import StopPolicy
from .progress import LogWindow, Progress
from .runtime import Runtime
from .timers import PhaseTimer

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config, rt: Runtime, plan: BatchPlan, stage=None):
        if stage is None:
            from .stages.pretrain import Pretraining

            stage = Pretraining(cfg)
        self.cfg, self.rt, self.plan, self.stage = cfg, rt, plan, stage
        self.out_dir = stage.out_dir
        self.batch_dtype = autocast_dtype(cfg) or torch.float32
        torch.manual_seed(cfg.seed)
        self.loader = stage.train_loader(rt, plan, self.batch_dtype)
        self.steps_per_epoch = check_dataset_fits(plan, len(self.loader), self.loader.num_samples, stage.section)
        self.schedule = stage.schedule(self.steps_per_epoch, plan.global_batch)
        model = stage.network(rt)
        self.engine, self.optimizer, self.grads = build_engine(cfg, rt, plan, model,
                                                               stage.optimizer(model, self.schedule.peak_lr))
        self.model = self.engine.module
        self.objective = stage.objective(self.engine, rt, autocast_dtype(cfg))  # the loss of a micro-batch

        self.state = RunState()
        self.skips = SkippedSteps(rt.device, cfg.train.max_nonfinite_steps, cfg.checkpoint.dir)
        self.timer = PhaseTimer(cfg.logging.timers, rt.device)
        self.window = LogWindow(rt.device)
        self.metrics = MetricsLogger(self.out_dir, enabled=rt.is_main, tensorboard=cfg.logging.tensorboard)
        self.progress = Progress(self.schedule.total_steps, enabled=rt.is_main and cfg.logging.progress)
        self.cadence = Cadence(cfg.checkpoint, self.steps_per_epoch)
        self.stop = StopPolicy.of(cfg, rt, save=lambda: self.save(periodic=True))  # + checkpoint.every_minutes
        self.report_bad = BadSampleReport(self.loader.bad, self.out_dir, rt.rank)
        self._batches, self._saved_at = None, -1  # the epoch's iterator; step of the newest checkpoint written/read
        budget = cfg.train.time_budget_minutes
        self.planner = Planner(budget, self.schedule.warmup_steps, self.schedule.total_steps) if budget else None

    step = property(lambda self: self.state.step, doc="Optimizer steps taken.")
    epoch = property(lambda self: self.state.step // self.steps_per_epoch, doc="Epochs completed.")
    total_steps = property(lambda self: self.schedule.total_steps, doc="Steps of the whole schedule.")

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
        timer = self.timer
        lr = self.schedule(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        self.grads.prepare()
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            self.engine.set_gradient_accumulation_boundary(last)
            if last:
                self.grads.arm()  # its backward all-reduces each gradient bucket as soon as it is complete
            loss = self.objective(*batch, timer)  # forward and loss phases
            if last and timer.enabled and self.rt.world_size > 1:
                # Timers only: a barrier before the last backward bills the ranks' lateness so far (imbalance,
                # stragglers) to 'wait'. It sits here in both modes: after backward it would wait for the overlapped
                # all-reduces themselves. 'comm' is then the time from the end of backward to averaged gradients —
                # the whole all-reduce without overlap, what backward left exposed with it.
                with timer.phase("wait"):
                    torch.distributed.barrier()
            with timer.phase("backward"):
                self.engine.backward(loss)  # scaled by 1/accumulation: the step's gradient is the micro-batch mean
            loss_sum = loss_sum + loss.detach()
        with timer.phase("comm"):
            self.grads.finish()  # with overlap: only what backward did not hide
        with timer.phase("optimizer"):
            self.engine.step()  # the optimizer skips a non-finite step on the device (fp16: through the loss scaler)
            self.skips.update(self.optimizer.step_ok)
            self.objective.end_step(self.state.step, self.total_steps)
        self.state.step += 1
        return loss_sum / len(micro_batches)

    # ------------------------------------------------------------------------------------------------------------ #
    def train(self) -> dict:
        """Train to the end (or to a stop request), checkpoint, evaluate. The result has ``stop_reason``: None for a
        finished run, else 'signal' (preempted: checkpoint written, no evaluation), 'deadline' or 'stop_at_step'."""
        rt = self.rt
        self.resume()
        start_step, t_start = self.state.step, time.monotonic()
        self.t_start, self.eval_s = t_start, 0.0
        self.save_config("The resolved config of this run")
        if rt.is_main:
            log.info(self.stage.describe(self))
        self.stop.start_clock()
        if self.planner is not None and self.state.total_steps == 0:
            self.planner.start(t_start)
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
        results = self.evaluate("final")
        if rt.is_main:
            self.stage.finish(self, results, time.monotonic() - t_start, self.state.step - start_step, reason)
        self.metrics.close()
        return {"stop_reason": reason, "bad_samples": len(self.loader.bad.bad), **results}

    def after_step(self) -> str | None:
        """Log, checkpoint and evaluate where the step just taken calls for it; then the all-rank stop decision."""
        step = self.state.step
        last = step >= self.total_steps
        postfix = None
        if step % self.stage.log_every == 0 or last:
            postfix = self.log_train()
            self.report_bad()
        self.progress.update(1, postfix)
        if self.planner is not None:
            plan_length(self)  # a time budget: decide the length in the warm-up, re-plan at epoch boundaries
        if self.cadence.due(step, last):
            self.save(periodic=True)  # after a re-plan: the checkpoint carries the length the run goes on with
        if last:
            return None
        every = self.stage.monitor_every_epochs
        if every and step % self.steps_per_epoch == 0 and (step // self.steps_per_epoch) % every == 0:
            self.evaluate("monitor")
        return self.stop.reason(step)

    def set_length(self, total: int, bend_step: int = 0, bend_progress: float = 0.0, warmup_steps: int = 0) -> None:
        """A time budget's length (``fastclr.budget``): the cosine bent at ``bend_step`` (Schedule.rescaled), a shorter
        warm-up if > 0. Kept in the run state: a restart continues with the same schedule."""
        s, w = self.schedule, warmup_steps or self.state.warmup_steps
        self.schedule = type(s)(total, w or s.warmup_steps, s.peak_lr, s.final_lr, bend_step, bend_progress)
        self.state.total_steps, self.state.bend_step, self.state.bend_progress = total, bend_step, bend_progress
        self.state.warmup_steps, self.progress.total = w, total
        self.stage.record_length(total / self.steps_per_epoch, self.schedule.warmup_steps / self.steps_per_epoch)

    def log_train(self) -> str:
        step, window_steps = self.state.step, self.state.step - self.window.first_step
        loss, ips = self.window.pop(step, self.plan.global_batch)  # host syncs: only at log steps
        self.state.nonfinite_steps = self.skips.check(step)[0]
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

    def evaluate(self, kind: str) -> dict:
        """The stage's evaluation (``kind``: 'final', 'monitor', or 'budget' — the one a time budget times), logged with
        the training seconds it follows (wall time less all evaluations)."""
        t0 = time.monotonic()
        results = self.stage.evaluate(self, kind)
        train_s, self.eval_s = t0 - self.t_start - self.eval_s, self.eval_s + time.monotonic() - t0
        self.metrics.log("eval", self.state.step, {"epoch": self.state.step / self.steps_per_epoch, "train_s": train_s,
                                                   "eval_s": time.monotonic() - t0, **results})
        return results

    def save_config(self, note: str) -> None:
        if self.rt.is_main:
            save_config(self.cfg, os.path.join(self.out_dir, "config.yaml"), f"{note}: a recipe (fastclr "
                        f"{self.stage.name} --config <this file>).")

    # ------------------------------------------------------------------------------------------------------------ #
    def save(self, periodic: bool = False, force: bool = False) -> None:
        """A checkpoint of this step (once, unless ``force``). ``periodic``: not in the middle of a non-finite streak,
        whose batches also went through BN's statistics; the previous checkpoint stays newest until a good step."""
        if self._saved_at == self.state.step and not force:
            return
        self.state.nonfinite_steps, streak = self.skips.check(self.state.step)
        if periodic and streak:
            return
        rank_state = {"loader": self.loader.state_dict(), "rng": checkpoint.rng_state()}
        checkpoint.save(self.engine, self.cfg.checkpoint.dir, self.state.step,
                        self.state.to_client(self.cfg, self.rt.world_size, self.steps_per_epoch), rank_state,
                        self.rt.rank, self.cfg.checkpoint.keep)
        self._saved_at = self.state.step
        self.stop.checkpointed()

    def resume(self) -> bool:
        """Continue from ``checkpoint.resume``'s choice; False when there is nothing to resume."""
        state = checkpoint.restore(self.engine, self.loader, self.cfg, self.rt.world_size, self.rt.rank)
        if state is None:
            return False
        self.state, self._saved_at = state, state.step
        self.skips.reset(state.nonfinite_steps)
        if state.total_steps:  # a length chosen for a time budget: the same schedule as before the restart
            self.set_length(state.total_steps, state.bend_step, state.bend_progress, state.warmup_steps)
        self.objective.resume(state.step, self.plan)
        return True

    def close(self) -> None:
        self.metrics.close()
        self.stage.close()
