"""SimCLR pretraining on DeepSpeed: one trainer with small named steps.

Per optimizer step: two views of B images → one forward over the 2B batch (BN statistics over both views, as in the
reference implementation) → NT-Xent against every rank's embeddings → backward → LARS with the LR a pure function of
the step. Precision is autocast (bf16, or fp16 with loss scaling on GPU); parameters, BN statistics and LARS state are
fp32. Activations are channels_last from the data pipeline on.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time

import numpy as np
import torch

from . import checkpoint
from .config import BatchPlan, Config, ConfigError, deepspeed_config, to_dict, validate_run
from .eval import evaluate_encoder
from .metrics import MetricsLogger, PhaseTimer, Progress, plot_run
from .runtime import Runtime, barrier

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def preflight(cfg: Config, world_size: int, cuda: bool) -> BatchPlan:
    """Everything that can be checked before any process group, model or pipeline exists."""
    plan = validate_run(cfg, world_size, cuda)
    if cfg.data.dataset != "digits" and not cfg.data.eval_path:
        raise ConfigError("config field 'data.eval_path': the final kNN / linear-probe evaluation needs a held-out "
                          f"labelled split of the same kind as data.path ('{cfg.data.dataset}')")
    for field, path in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
        if cfg.data.dataset != "digits" and path and cfg.data.dataset != "tar" and not os.path.exists(path):
            raise FileNotFoundError(f"config field '{field}': '{path}' does not exist")
    return plan


def build_model(cfg: Config, norm_layer=None):
    from .models import ProjectionHead, SimCLRModel, build_backbone

    backbone = build_backbone(cfg.model.arch, width_mult=cfg.model.width_mult, cifar_stem=cfg.model.cifar_stem,
                              norm_layer=norm_layer, zero_init_residual=cfg.model.zero_init_residual)
    head = ProjectionHead(backbone.feature_dim, cfg.model.proj_hidden_dim, cfg.model.proj_out_dim,
                          num_layers=cfg.model.proj_layers, norm_layer=norm_layer or torch.nn.BatchNorm1d)
    return SimCLRModel(backbone, head)


def peak_lr(cfg: Config, global_batch: int) -> float:
    from .optim import scaled_lr

    if cfg.optim.lr_scaling == "none":
        return cfg.optim.base_lr
    return scaled_lr(cfg.optim.base_lr, global_batch, cfg.optim.lr_scaling)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignals:
    """SIGUSR1 (Slurm's warning ahead of the time limit) and SIGTERM (preemption) ask for a clean stop: the handler
    only records the signal; the training loop finishes its step, checkpoints and exits."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class Trainer:
    def __init__(self, cfg: Config, rt: Runtime, plan: BatchPlan):
        import deepspeed

        from .data import build_train_loader
        from .optim import LARS, param_groups

        self.cfg, self.rt, self.plan = cfg, rt, plan
        self.autocast_dtype = AUTOCAST_DTYPES[cfg.precision.dtype]
        self.batch_dtype = self.autocast_dtype or torch.float32
        torch.manual_seed(cfg.seed)
        self.loader = build_train_loader(cfg.data, batch_size=plan.micro_batch, shard_id=rt.rank,
                                         num_shards=rt.world_size, device=rt.device, dtype=self.batch_dtype,
                                         channels_last=cfg.precision.channels_last)
        self.steps_per_epoch = len(self.loader) // plan.accumulation
        if self.steps_per_epoch < 1:
            raise ValueError(f"config field 'train.global_batch_size': {plan.global_batch} is larger than the "
                             f"dataset's {self.loader.num_samples} samples; lower it")
        self.total_steps = max(1, round(cfg.train.epochs * self.steps_per_epoch))
        self.warmup_steps = min(self.total_steps - 1, round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.peak_lr = peak_lr(cfg, plan.global_batch)

        model = build_model(cfg, norm_layer=self._norm_layer())
        lars = LARS(param_groups(model, cfg.optim.weight_decay), lr=self.peak_lr, momentum=cfg.optim.momentum,
                    trust_coefficient=cfg.optim.trust_coefficient)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=lars,
                                                                 config=deepspeed_config(cfg, plan))
        self.model = self.engine.module
        # The gradient all-reduce is called by the trainer (not inside backward) so that it can be timed on its own.
        self.engine.enable_backward_allreduce = False
        self.timer = PhaseTimer(cfg.logging.timers, rt.device)
        self._memory_format = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
        if cfg.precision.channels_last:
            # After initialize: DeepSpeed broadcasts rank 0's parameters as byte views, which needs contiguous
            # tensors. ``.to(memory_format=...)`` swaps each parameter's data in place, so the optimizer and engine
            # keep valid references.
            self.model.to(memory_format=self._memory_format)
        self.loss_group = "world" if (cfg.loss.global_negatives and rt.world_size > 1) else None
        self.metrics = MetricsLogger(cfg.logging.dir, enabled=rt.is_main, tensorboard=cfg.logging.tensorboard)
        self.step = 0
        self.epoch = 0
        self.nonfinite_steps = 0
        self._nonfinite_in_row = 0
        self.signals = StopSignals()
        # Control flags (stop requests) go over gloo even when the data path is NCCL: no GPU sync per step.
        self._control_group = (torch.distributed.new_group(backend="gloo") if rt.world_size > 1 and rt.cuda
                               else None)

    def _norm_layer(self):
        size = self.cfg.distributed.bn_group_size or self.rt.world_size
        if not self.cfg.distributed.global_bn or size == 1:
            return None  # statistics of one rank: ATen's own batch norm
        from .distributed import global_bn_layer

        return global_bn_layer(size)

    # ------------------------------------------------------------------------------------------------------------ #
    def lr_at(self, step: int) -> float:
        from .optim import lr_at

        return lr_at(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, peak_lr=self.peak_lr,
                     final_lr=self.cfg.optim.final_lr)

    def train_step(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        """One micro-batch: forward, loss, backward, and at accumulation boundaries the gradient all-reduce and LARS."""
        from .losses import nt_xent

        timer = self.timer
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with timer.phase("forward"):
            x = torch.cat([view_a, view_b])  # (2B, 3, H, W), channels_last preserved by cat
            z = self.engine(x)  # (2B, d); the engine applies autocast
        with timer.phase("loss"):
            z_a, z_b = z.chunk(2)
            loss = nt_xent(z_a, z_b, temperature=self.cfg.loss.temperature, impl=self.cfg.loss.impl,
                           group=self.loss_group)
        with timer.phase("backward"):
            self.engine.backward(loss)
        if self.engine.is_gradient_accumulation_boundary():
            if timer.enabled and self.rt.world_size > 1:
                # Timers only: a barrier first, so that waiting for the slowest rank (imbalance, stragglers) is
                # billed to 'wait' and 'comm' holds the all-reduce alone.
                with timer.phase("wait"):
                    torch.distributed.barrier()
            with timer.phase("comm"):
                self.engine.allreduce_gradients()
            with timer.phase("optimizer"):
                scaler = self.engine.torch_autocast_z0_gradscaler
                if scaler is None:
                    self._skip_if_nonfinite()
                    self.engine.step()
                else:  # fp16: the scaler skips overflowing steps and halves its scale; count them from the scale
                    scale = scaler.get_scale()
                    self.engine.step()
                    self.nonfinite_steps += int(scaler.get_scale() < scale)
        else:
            self.engine.step()  # DeepSpeed counts micro-steps here; the optimizer runs only at boundaries
        return loss.detach()

    def _skip_if_nonfinite(self) -> None:
        """inf/NaN gradients: drop them, so that LARS (which skips parameters without a gradient) leaves parameters
        and momentum as they were, and count the step. After the all-reduce every rank holds the same gradients, so
        every rank decides the same. One host sync per step, as a loss scaler has (fp16 is left to DeepSpeed's
        GradScaler, which skips overflowing steps itself)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            self._nonfinite_in_row = 0
            return
        for p in self.model.parameters():
            p.grad = None
        self.nonfinite_steps += 1
        self._nonfinite_in_row += 1
        if self.rt.is_main:
            print(f"fastclr: step {self.step + 1}: non-finite gradients, step skipped "
                  f"({self._nonfinite_in_row} in a row, {self.nonfinite_steps} in all)", flush=True)
        if self._nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self._nonfinite_in_row} steps in a row had non-finite gradients (train.max_nonfinite_steps="
                f"{self.cfg.train.max_nonfinite_steps}); stopping without saving. The last complete checkpoint in "
                f"{self.cfg.checkpoint.dir} is intact: lower optim.base_lr or check the data, then resume.")

    def _batches(self):
        """The loader's batches, with the time spent waiting for each billed to the 'data' phase."""
        it = iter(self.loader)
        while True:
            with self.timer.phase("data"):
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    def train(self) -> dict:
        """Train to the end (or to a stop request), checkpoint, evaluate. The result has ``stop_reason``: None for a
        finished run, else 'signal' (preempted: checkpoint written, no evaluation), 'deadline' or 'stop_at_step'."""
        cfg, rt = self.cfg, self.rt
        self.maybe_resume()
        start_step, t_start = self.step, time.monotonic()
        self._deadline = t_start + cfg.train.max_minutes * 60 if cfg.train.max_minutes else math.inf
        self.progress = Progress(self.total_steps, enabled=rt.is_main and cfg.logging.progress, initial=self.step)
        if rt.is_main:
            print(f"fastclr: {cfg.model.arch} x{cfg.model.width_mult:g} on {cfg.data.dataset}, {rt.world_size} rank(s) "
                  f"on {rt.device.type}, global batch {self.plan.global_batch} = {self.plan.micro_batch} x "
                  f"{self.plan.accumulation} x {rt.world_size}, {self.total_steps} steps "
                  f"({self.steps_per_epoch}/epoch), peak LR {self.peak_lr:.3g}, loss impl {cfg.loss.impl}", flush=True)
        self._loss_sum, self._n_loss = torch.zeros((), device=rt.device), 0
        self._t_log, self._step_log = time.monotonic(), self.step
        stop = None
        with self.signals:
            while self.step < self.total_steps and stop is None:
                stop = self.train_epoch()
        self.progress.close()
        self.report_bad_samples()
        self.save()
        elapsed = time.monotonic() - t_start
        if stop == "signal":
            if rt.is_main:
                print(f"fastclr: signal {self.signals.received} received: checkpoint at step {self.step} written, "
                      "exiting for requeue", flush=True)
            return {"stop_reason": stop}
        results = self.final_evaluation()
        if rt.is_main:
            self.finish(results, elapsed, start_step, stop)
        return {"stop_reason": stop, "bad_samples": len(self.loader.bad.bad), **results}

    def train_epoch(self) -> str | None:
        """Train to the end of the current epoch (or of the run); the stop reason if asked to stop early."""
        accumulation = self.plan.accumulation
        micro_per_epoch = self.steps_per_epoch * accumulation
        position = self.loader.state_dict()["position"]
        for view_a, view_b in self._batches():
            self._loss_sum += self.train_step(view_a, view_b)
            self._n_loss += 1
            position += 1
            if position % accumulation:
                continue
            self.step += 1
            self.after_step()
            if self.step >= self.total_steps:
                return None
            if position >= micro_per_epoch:
                break
            stop = self.stop_requested()
            if stop:
                return stop
        self.epoch += 1
        self.loader.set_epoch(self.epoch)
        self._end_of_epoch()
        return self.stop_requested() if self.step < self.total_steps else None

    def stop_requested(self) -> str | None:
        """Agreed by every rank at every step: a signal or a clock reaches each rank at a different moment, and a rank
        that left the loop alone would hang the others in the next collective. The flags travel on a CPU (gloo) group,
        so the check costs no device synchronisation."""
        if self.step == self.cfg.train.stop_at_step:
            return "stop_at_step"
        flags = torch.tensor([float(self.signals.received is not None), float(time.monotonic() > self._deadline)])
        if self.rt.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self._control_group)
        if flags[0]:
            self.signals.received = self.signals.received or "peer"
            return "signal"
        return "deadline" if flags[1] else None

    def after_step(self) -> None:
        cfg = self.cfg
        postfix = None
        if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
            postfix = self.log_train()
            self.report_bad_samples()
        self.progress.update(1, postfix)
        # No periodic checkpoint in the middle of a non-finite streak: the batch that overflowed also went through
        # BN's running statistics; the previous checkpoint stays the newest until a good step follows.
        if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 and not self._nonfinite_in_row:
            self.save()

    def log_train(self) -> str:
        mean_loss = (self._loss_sum / self._n_loss).item()  # host sync: only at log steps
        now = time.monotonic()
        ips = (self.step - self._step_log) * self.plan.global_batch / max(now - self._t_log, 1e-9)
        lr = self.lr_at(self.step - 1)
        scaler = self.engine.torch_autocast_z0_gradscaler
        extra = {"loss_scale": scaler.get_scale()} if scaler is not None else {}
        self.metrics.log("train", self.step, {"loss": mean_loss, "lr": lr, "images_per_s": ips, **extra,
                                              "nonfinite_steps": self.nonfinite_steps,
                                              "bad_samples": len(self.loader.bad.bad),
                                              "images_per_s_per_device": ips / self.rt.world_size,
                                              "epoch": self.step / self.steps_per_epoch,
                                              **self.timer.pop_ms_per_step(self.step - self._step_log)})
        self._loss_sum.zero_()
        self._n_loss, self._t_log, self._step_log = 0, now, self.step
        return f"loss {mean_loss:.4f} lr {lr:.3g} {ips:.0f} img/s"

    def report_bad_samples(self) -> None:
        """Name the bad images this rank met since the last report, and rewrite its list of all of them."""
        fresh = self.loader.bad.new_since_last_call()
        if not fresh:
            return
        everything = self.loader.bad.names()
        path = os.path.join(self.cfg.logging.dir, f"bad_samples.rank{self.rt.rank}.tsv")
        os.makedirs(self.cfg.logging.dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(f"{name}\t{reason}\n" for name, reason in everything)
        os.replace(tmp, path)
        for name, reason in fresh[:5]:
            print(f"fastclr: rank {self.rt.rank}: skipped bad image {name}: {reason}", flush=True)
        more = f" ({len(fresh) - 5} more)" if len(fresh) > 5 else ""
        print(f"fastclr: rank {self.rt.rank}: {len(everything)} bad image(s) skipped so far{more}, listed in {path}",
              flush=True)

    def _end_of_epoch(self) -> None:
        cfg = self.cfg
        if self.step >= self.total_steps:
            return
        if cfg.checkpoint.every_epochs and self.epoch % cfg.checkpoint.every_epochs == 0 and not self._nonfinite_in_row:
            self.save()
        if cfg.eval.every_epochs and self.epoch % cfg.eval.every_epochs == 0:
            self.evaluate(with_baseline=False, probe=False)

    # ------------------------------------------------------------------------------------------------------------ #
    def client_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "config": to_dict(self.cfg),
                "world_size": self.rt.world_size, "nonfinite_steps": self.nonfinite_steps}

    def rank_state(self) -> dict:
        return {"loader": self.loader.state_dict(), "rng": _rng_state()}

    def save(self) -> str:
        return checkpoint.save(self.engine, self.cfg.checkpoint.dir, self.step, self.client_state(),
                               self.rank_state(), self.rt.rank, self.cfg.checkpoint.keep)

    def maybe_resume(self) -> bool:
        where = checkpoint.resolve(self.cfg.checkpoint.dir, self.cfg.checkpoint.resume)
        if where is None:
            return False
        saved_model = checkpoint.read_meta(where).get("config", {}).get("model")
        current_model = to_dict(self.cfg)["model"]
        if saved_model is not None and saved_model != current_model:
            diff = sorted(k for k in current_model if saved_model.get(k) != current_model[k])
            raise ConfigError(f"config field 'model.{diff[0]}': the checkpoint in {os.path.join(*where)} was trained "
                              f"with {diff[0]}={saved_model.get(diff[0])!r}, this run has {current_model[diff[0]]!r}; "
                              "use the same model settings, another checkpoint.dir, or checkpoint.resume=none")
        client, rank_state = checkpoint.load(self.engine, where, self.rt.rank)
        self.step, self.epoch = int(client["step"]), int(client["epoch"])
        self.nonfinite_steps = int(client.get("nonfinite_steps", 0))
        if client.get("world_size", self.rt.world_size) != self.rt.world_size and self.rt.is_main:
            print(f"fastclr: resuming a {client['world_size']}-rank checkpoint on {self.rt.world_size} ranks: the data "
                  "order of the current epoch changes", flush=True)
        if rank_state.get("loader") and client.get("world_size") == self.rt.world_size:
            self.loader.load_state_dict(rank_state["loader"])
        else:
            self.loader.set_epoch(self.epoch)
        _set_rng_state(rank_state.get("rng", {}))
        if self.rt.is_main:
            print(f"fastclr: resumed from {os.path.join(*where)} at step {self.step}, epoch {self.epoch}", flush=True)
        return True

    # ------------------------------------------------------------------------------------------------------------ #
    def _eval_loaders(self):
        from .data import build_eval_loader

        kw = dict(batch_size=256, device=self.rt.device, dtype=self.batch_dtype,
                  channels_last=self.cfg.precision.channels_last, max_images=self.cfg.eval.max_eval_images)
        return build_eval_loader(self.cfg.data, "train", **kw), build_eval_loader(self.cfg.data, "test", **kw)

    def evaluate(self, with_baseline: bool, probe: bool = True) -> dict:
        """Rank 0 evaluates the (replicated) encoder; the others wait. Returns {} on other ranks."""
        results = {}
        if self.rt.is_main:
            e = self.cfg.eval
            kw = dict(knn_k=e.knn_k, knn_temperature=e.knn_temperature, probe_epochs=e.probe_epochs if probe else 0,
                      probe_lr=e.probe_lr, autocast_dtype=self.autocast_dtype, seed=self.cfg.seed)
            train_loader, test_loader = self._eval_loaders()
            results = evaluate_encoder(self.model, train_loader, test_loader, self.rt.device, **kw)
            if with_baseline:
                # The same seed rebuilds exactly the initialisation this run started from.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.cfg.seed)
                    baseline = build_model(self.cfg).to(self.rt.device, memory_format=self._memory_format)
                base = evaluate_encoder(baseline, train_loader, test_loader, self.rt.device, **kw)
                results.update({f"baseline_{k}": v for k, v in base.items()})
            self.metrics.log("eval", self.step, {"epoch": self.epoch, **results})
        barrier()
        return results

    def final_evaluation(self) -> dict:
        return self.evaluate(with_baseline=self.cfg.eval.baseline)

    def finish(self, results: dict, elapsed: float, start_step: int, stop: str | None) -> None:
        from .models.export import save_backbone

        run_dir = self.cfg.logging.dir
        backbone_path = os.path.join(run_dir, "backbone.pt")
        save_backbone(self.model, backbone_path)
        self.metrics.close()
        plots = plot_run(run_dir)
        steps = self.step - start_step
        print(f"fastclr: {steps} steps in {elapsed / 60:.1f} min "
              f"({steps * self.plan.global_batch / max(elapsed, 1e-9):.0f} images/s incl. checkpoints)"
              + (f" — stopped early ({stop})" if stop else ""), flush=True)
        print(f"fastclr: checkpoints in {self.cfg.checkpoint.dir}, metrics/plots in {run_dir} "
              f"({', '.join(os.path.basename(p) for p in plots)}), backbone in {backbone_path}", flush=True)
        line = f"fastclr: RESULT kNN top-1 {results['knn_top1']:.1f}%"
        if "baseline_knn_top1" in results:
            line += f" (random init {results['baseline_knn_top1']:.1f}%)"
        if "probe_top1" in results:
            line += f" | linear probe top-1 {results['probe_top1']:.1f}%"
            if "baseline_probe_top1" in results:
                line += f" (random init {results['baseline_probe_top1']:.1f}%)"
        print(line, flush=True)

    def close(self) -> None:
        self.metrics.close()


def run(cfg: Config) -> dict:
    """Entry point used by launchers/pretrain.py: checks, sets up the world, trains, evaluates."""
    from . import runtime

    _, world_size, _ = runtime.world_from_env()
    plan = preflight(cfg, world_size, torch.cuda.is_available())
    rt = runtime.setup(cfg.distributed.backend)
    trainer = Trainer(cfg, rt, plan)
    try:
        results = trainer.train()
    finally:
        trainer.close()
    if results["stop_reason"] == "signal" and rt.is_main:
        from .slurm import requeue

        requeue()  # after the checkpoint is complete on every rank (save() ends in a barrier); no-op outside Slurm
    return results
