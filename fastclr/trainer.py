"""The step engine and loop of every stage on DeepSpeed; a stage (:mod:`fastclr.stages`) brings its data, network,
optimizer kind and objective. One step (``train_step``): per accumulation micro-batch the objective's forward and
loss, then backward, whose last one all-reduces the gradients as they come; then the optimizer (LARS or Nesterov SGD,
the LR a pure function of the step), which skips a non-finite step on the device. No host sync in it
(tests/test_host_syncs.py). Autocast (bf16, or fp16 with loss scaling); fp32 parameters, BN statistics and optimizer
state; channels_last activations. The loop (``train``): resume → steps, with logging, checkpoints (when:
:class:`fastclr.cadence.Cadence`), monitors and the all-rank stop vote (:class:`fastclr.preemption.StopPolicy`) →
final checkpoint → the stage's evaluation and outputs."""
from __future__ import annotations

import logging
import os
import time

import torch

from . import checkpoint
from .bad_images import BadSampleReport
from .budget import Length, Planner
from .cadence import Cadence
from .checkpoint import RunState
from .config import BatchPlan, Config, autocast_dtype, check_dataset_fits, save_config
from .engine import build_engine
from .metrics import MetricsLogger
from .optim import SkippedSteps
from .preemption import StopPolicy
from .progress import LogWindow, Progress
from .runtime import Runtime
from .stages.pretrain import Pretraining
from .timers import PhaseTimer

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config, rt: Runtime, plan: BatchPlan, stage=None):
        stage = stage or Pretraining(cfg)  # a stage of fastclr.stages; pretraining by default
        self.cfg, self.rt, self.plan, self.stage = cfg, rt, plan, stage
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
        self.metrics = MetricsLogger(stage.out_dir, enabled=rt.is_main, tensorboard=cfg.logging.tensorboard)
        self.progress = Progress(self.schedule.total_steps, enabled=rt.is_main and cfg.logging.progress)
        self.cadence = Cadence(cfg.checkpoint, self.steps_per_epoch)
        self.stop = StopPolicy.of(cfg, rt)
        self.report_bad = BadSampleReport(self.loader.bad, stage.out_dir, rt.rank)
        self._batches, self._saved_at = None, -1  # the epoch's iterator; step of the newest checkpoint written/read
        self.planner = Planner.of(cfg, rt, stage, self.schedule, self.steps_per_epoch)  # None without a time budget

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
                # Timers only: a barrier bills the ranks' lateness (imbalance, stragglers) to 'wait'; after backward it
                # would wait for the overlapped all-reduces. 'comm': end of backward to averaged gradients.
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
        self.resume()
        start_step, self.t_start, self.eval_s = self.state.step, time.monotonic(), 0.0
        self.save_config("The resolved config of this run")
        if self.rt.is_main:
            log.info(self.stage.describe(self))
        self.stop.start_clock()
        self.cadence.start_clock()
        if self.planner is not None and self.state.total_steps == 0:
            self.planner.start(self.t_start)
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
        if self.rt.is_main:
            self.stage.finish(self, results, time.monotonic() - self.t_start, self.state.step - start_step, reason)
        self.metrics.close()
        return {"stop_reason": reason, "bad_samples": len(self.loader.bad.bad), **results}

    def after_step(self) -> str | None:
        """Log, checkpoint and evaluate where the step just taken calls for it; then the all-rank stop decision."""
        step, postfix = self.state.step, None
        last = step >= self.total_steps
        if step % self.stage.log_every == 0 or last:
            postfix = self.log_train()
            self.report_bad()
        self.progress.update(1, postfix)
        if self.planner is not None:
            self.plan_length()  # a time budget: decide the length in the warm-up, re-plan at epoch boundaries
        reason, minutes_up = (None, False) if last else self.stop.vote(step, self.cadence.minutes_up())
        if self.cadence.due(step, last, minutes_up):
            self.save(periodic=True)  # after a re-plan: the checkpoint carries the length the run goes on with
        if last:
            return None
        every = self.stage.monitor_every_epochs
        if every and step % self.steps_per_epoch == 0 and (step // self.steps_per_epoch) % every == 0:
            self.evaluate("monitor")
        return reason

    def plan_length(self) -> None:
        """Ask the time budget's planner; apply and record the length it chooses (``fastclr.budget``)."""
        p, step, now = self.planner, self.state.step, time.monotonic()
        due, length = p.due(step, now, bool(self.state.total_steps), self.total_steps), None
        if due == "decide":  # one evaluation and one checkpoint timed, then the length
            self.evaluate("budget")
            t1 = time.monotonic()
            self.save(force=True)
            length = p.decide(step, now, t1 - now, time.monotonic() - t1, self.schedule.warmup_steps)
        elif due == "replan":
            length = p.replan(step, now, now - self.t_start - self.eval_s, self.eval_s, self.total_steps,
                              self.schedule.warmup_steps, self.schedule.progress(step))
        if length is not None:
            self.apply_length(length)
            self.save_config(f"The resolved config of this run, its length chosen for a {p.budget_s / 60:g}-min budget")
        if due == "decide":
            self.save(force=True)  # the same step again, now with the chosen length: a restart keeps it
            p.decided_at(step, time.monotonic() - self.t_start - self.eval_s, self.eval_s)

    def apply_length(self, length) -> None:
        """A time budget's :class:`fastclr.budget.Length`, kept in the run state: a restart continues with the same
        schedule; the stage's config records it (config.yaml is then a recipe of this run)."""
        s, w = self.schedule, length.warmup_steps or self.state.warmup_steps
        self.schedule = type(s)(length.total, w or s.warmup_steps, s.peak_lr, s.final_lr, length.bend_step,
                                length.bend_progress)
        self.state.chose(length, w)
        self.progress.total = length.total
        self.stage.record_length(length.total / self.steps_per_epoch, self.schedule.warmup_steps / self.steps_per_epoch)

    def log_train(self) -> str:
        step, window_steps = self.state.step, self.state.step - self.window.first_step
        loss, ips = self.window.pop(step, self.plan.global_batch)  # host syncs: only at log steps
        self.state.nonfinite_steps = self.skips.check(step)[0]
        lr = self.schedule(step - 1)
        scaler = self.engine.torch_autocast_z0_gradscaler
        extra = {"loss_scale": scaler.get_scale()} if scaler is not None else {}
        self.metrics.log("train", step, {"loss": loss, "lr": lr, "images_per_s": ips, **extra,
                                         "nonfinite_steps": self.state.nonfinite_steps,
                                         "bad_samples": len(self.loader.bad.bad), "epoch": step / self.steps_per_epoch,
                                         "images_per_s_per_device": ips / self.rt.world_size,
                                         **self.timer.pop_ms_per_step(window_steps)})
        return f"loss {loss:.4f} lr {lr:.3g} {ips:.0f} img/s"

    def evaluate(self, kind: str) -> dict:
        """The stage's evaluation (``kind``: 'final', 'monitor', or 'budget': the one a time budget times), logged
        with the training seconds it follows (wall time less all evaluations)."""
        t0 = time.monotonic()
        results = self.stage.evaluate(self, kind)
        train_s, self.eval_s = t0 - self.t_start - self.eval_s, self.eval_s + time.monotonic() - t0
        self.metrics.log("eval", self.state.step, {"epoch": self.state.step / self.steps_per_epoch, "train_s": train_s,
                                                   "eval_s": time.monotonic() - t0, **results})
        return results

    def save_config(self, note: str) -> None:
        if self.rt.is_main:
            save_config(self.cfg, os.path.join(self.stage.out_dir, "config.yaml"), f"{note}: a recipe (fastclr "
                        f"{self.stage.name} --config <this file>).")

    # ------------------------------------------------------------------------------------------------------------ #
    def save(self, periodic: bool = False, force: bool = False) -> None:
        """A checkpoint of this step (once, unless ``force``); ``periodic``: a cadence's, which it may refuse."""
        if self._saved_at == self.state.step and not force:
            return
        self.state.nonfinite_steps, streak = self.skips.check(self.state.step)
        if not self.cadence.allows(periodic, streak):
            return
        client = {**self.state.to_client(self.cfg, self.rt.world_size, self.steps_per_epoch), **self.stage.identity}
        checkpoint.save(self.engine, self.cfg.checkpoint.dir, self.state.step, client,
                        {"loader": self.loader.state_dict(), "rng": checkpoint.rng_state()}, self.rt.rank,
                        self.cfg.checkpoint.keep)
        self._saved_at = self.state.step
        self.cadence.saved()

    def resume(self) -> bool:
        """Continue from ``checkpoint.resume``'s choice; False when there is nothing to resume."""
        state = checkpoint.restore(self.engine, self.loader, self.cfg, self.rt.world_size, self.rt.rank,
                                   self.stage.identity)
        if state is None:
            return False
        self.state, self._saved_at = state, state.step
        self.skips.reset(state.nonfinite_steps)
        if state.total_steps:  # a length chosen for a time budget: the same schedule as before the restart
            self.apply_length(Length(state.total_steps, state.bend_step, state.bend_progress, state.warmup_steps))
        self.objective.resume(state.step, self.plan)
        return True

    def close(self) -> None:
        self.metrics.close()
