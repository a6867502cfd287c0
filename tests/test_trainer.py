"""Short real training runs of the whole stack on the embedded digits (one process, CPU)."""
import json

import pytest
import torch

from fastclr import checkpoint
from fastclr.config import ConfigError, validate_run
from tests.helpers import make_trainer as _trainer
from tests.helpers import tiny_config as _cfg


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_short_run_loss_decreases_and_leaves_artifacts(tmp_path):
    cfg = _cfg(tmp_path, "train.epochs=6", "optim.warmup_epochs=1", "eval.probe_epochs=5", "eval.baseline=true")
    trainer = _trainer(cfg)
    results = trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == trainer.total_steps
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05, f"loss did not decrease: first {first:.4f}, last {last:.4f}"
    for key in ("knn_top1", "probe_top1", "baseline_knn_top1", "baseline_probe_top1"):
        assert 0 <= results[key] <= 100
    for name in ("metrics.csv", "loss.png", "lr.png", "images_per_s.png", "accuracy.png", "backbone.pt"):
        assert (tmp_path / name).is_file(), name
    assert checkpoint.complete_tags(str(tmp_path / "ckpt"))[-1][0] == trainer.total_steps


def test_resume_continues_at_the_saved_step_with_identical_state(tmp_path):
    cfg = _cfg(tmp_path, "train.epochs=3", "train.stop_at_step=7")
    first = _trainer(cfg)
    first.train()
    assert first.step == 7
    saved = _params(first.model)
    saved_momentum = [s["momentum_buffer"].clone() for s in first.optimizer.state.values()]
    saved_loader = first.loader.state_dict()

    second = _trainer(_cfg(tmp_path, "train.epochs=3"))
    assert second.resume()
    assert second.step == 7 and second.epoch == first.epoch
    assert second.loader.state_dict() == saved_loader
    for k, v in _params(second.model).items():
        assert torch.equal(v, saved[k]), k
    for a, b in zip(saved_momentum, [s["momentum_buffer"] for s in second.optimizer.state.values()]):
        assert torch.equal(a, b)
    second.cfg.checkpoint.resume = "none"  # already resumed above
    second.train()
    assert second.step == second.total_steps


def test_run_checks_fail_before_compute(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path.*does not exist"):
        validate_run(_cfg(tmp_path, "data.dataset=folder", f"data.path={tmp_path}/missing",
                          f"data.eval_path={tmp_path}"), 1, False)
    with pytest.raises(ConfigError, match="data.eval_path"):
        validate_run(_cfg(tmp_path, "data.dataset=folder", f"data.path={tmp_path}"), 1, False)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        validate_run(_cfg(tmp_path), 3, False)


def test_tiled_and_naive_loss_give_the_same_training_curve(tmp_path):
    """Same seed, same batches: the loss implementation must not change what is learned (within 1e-4 a step).

    At a tenth of the recipe's LR: BN weights and biases take plain momentum SGD at the full LR (SimCLR's exclusion
    rule), and at LR 1.0 the two implementations' fp32 rounding (5e-7 apart after one step) grows ~10× a step, which
    would measure the trajectory's sensitivity rather than the loss. Observed here: ≤ 6e-5 over 8 steps."""
    curves = {}
    for impl in ("naive", "tiled"):
        cfg = _cfg(tmp_path / impl, "train.epochs=3", "train.stop_at_step=8", f"loss.impl={impl}", "optim.base_lr=0.1",
                   "precision.dtype=fp32")
        _trainer(cfg).train()
        rows = [json.loads(line) for line in open(tmp_path / impl / "metrics.jsonl")]
        curves[impl] = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(curves["naive"]) == 8
    for step, (a, b) in enumerate(zip(curves["naive"], curves["tiled"])):
        assert abs(a - b) <= 1e-4, (step, a, b)


@pytest.mark.parametrize("micro, extra", [(0, ()), (128, ()), (128, ("model.momentum=0.99", "loss.memory_size=700"))],
                         ids=["accumulation1", "accumulation2", "accumulation2-memory"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, micro, extra):
    """2·S steps in one go vs S steps, a stop with checkpoint, a fresh trainer resuming, S more: same per-step losses
    (same data order and augmentations, restored from the loader's state) and identical parameters. With 2
    micro-batches of 128 a step, an epoch of 1,437 images is 11 micro-batches: 5 steps and one dropped tail."""
    s = 4  # 256-image batches: 5 steps an epoch, so the stop is mid-epoch and the resumed half crosses an epoch end
    common = ["train.epochs=4", "train.global_batch_size=256", "eval.max_eval_images=64",
              f"train.micro_batch_size={micro}", *extra]  # memory: 700 keys, a queue that wraps mid-run
    whole = _trainer(_cfg(tmp_path / "whole", *common, f"train.stop_at_step={2 * s}"))
    whole.train()
    first = _trainer(_cfg(tmp_path / "split", *common, f"train.stop_at_step={s}"))
    first.train()
    second = _trainer(_cfg(tmp_path / "split", *common, f"train.stop_at_step={2 * s}"))
    second.train()
    assert second.step == 2 * s

    def losses(run):
        rows = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]

    assert losses("split") == losses("whole")
    want = _params(whole.model)
    for k, v in _params(second.model).items():
        assert torch.equal(v, want[k]), k


def test_bf16_autocast_keeps_bn_and_lars_state_fp32_and_channels_last(tmp_path):
    """DeepSpeed's torch_autocast: convs run in bf16, but no parameter, BN statistic or LARS buffer leaves fp32, and
    the 4-d weights and the step's activations stay channels_last (no hidden layout conversion)."""
    trainer = _trainer(_cfg(tmp_path, "train.epochs=1", "train.stop_at_step=2", "precision.dtype=bf16"))
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((type(mod).__name__, inp[0], out)))
             for m in trainer.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    trainer.train()
    for h in hooks:
        h.remove()
    assert any(name == "Conv2d" and out.dtype == torch.bfloat16 for name, _, out in seen)  # autocast is on
    for name, x, out in seen:
        if x.dim() == 4:
            assert x.is_contiguous(memory_format=torch.channels_last), name
            assert out.is_contiguous(memory_format=torch.channels_last), name
    for k, v in trainer.model.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
    for p, state in trainer.optimizer.state.items():
        assert p.dtype == torch.float32 and state["momentum_buffer"].dtype == torch.float32
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)


def _poison_steps(monkeypatch, trainer, bad_steps):
    """Make the loss NaN at the given optimizer steps (0-based), as an overflowing or corrupt batch would."""
    import fastclr.losses

    real = fastclr.losses.nt_xent

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if trainer.step in bad_steps else loss

    monkeypatch.setattr(fastclr.losses, "nt_xent", poisoned)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    trainer = _trainer(_cfg(tmp_path, "train.epochs=1", "train.stop_at_step=6", "precision.dtype=fp32"))
    _poison_steps(monkeypatch, trainer, {3, 4})
    before = {}
    trainer.optimizer.register_step_pre_hook(
        lambda opt, a, k: before.__setitem__(trainer.step, _params(trainer.model)))
    trainer.train()
    assert trainer.state.nonfinite_steps == 2 and trainer.step == 6
    # A skipped step leaves every parameter as it was (BN running statistics aside: the forward ran).
    for k, v in before[4].items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[3][k]), k
    for k, v in _params(trainer.model).items():
        assert torch.isfinite(v).all(), k


def test_too_many_nonfinite_steps_stop_with_the_checkpoint_intact(tmp_path, monkeypatch):
    trainer = _trainer(_cfg(tmp_path, "train.epochs=1", "checkpoint.every_steps=2", "train.max_nonfinite_steps=3",
                            "precision.dtype=fp32"))
    _poison_steps(monkeypatch, trainer, set(range(3, 100)))
    with pytest.raises(FloatingPointError, match="3 steps in a row.*max_nonfinite_steps"):
        trainer.train()
    assert checkpoint.complete_tags(str(tmp_path / "ckpt"))[-1][0] == 2  # the last good one, untouched


def test_one_step_accumulates_its_micro_batches_and_steps_once(tmp_path):
    """accumulation 2: the gradient LARS sees is the mean of the two micro-batches' gradients (each micro-batch its
    own forward, BN statistics and negatives), and the optimizer runs once per step."""
    import copy

    from fastclr import losses

    trainer = _trainer(_cfg(tmp_path, "train.epochs=1", "train.micro_batch_size=32", "precision.dtype=fp32"))
    assert trainer.plan.accumulation == 2
    reference = copy.deepcopy(trainer.model)
    micro = trainer.next_micro_batches()
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, a, k: seen.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    loss = trainer.train_step(micro)
    assert len(seen) == 1 and trainer.step == 1
    total = 0.0
    for view_a, view_b in micro:
        z = reference(torch.cat([view_a, view_b]))
        part = losses.nt_xent(*z.chunk(2), temperature=trainer.cfg.loss.temperature, impl="naive")
        (part / 2).backward()
        total += part.item() / 2
    assert abs(loss.item() - total) < 1e-5
    for name, p in reference.named_parameters():
        # The trainer's loss is the tiled one, the reference naive: they round differently (observed ≤ 5e-6).
        assert ((seen[0][name] - p.grad).norm() / p.grad.norm()).item() < 1e-4, name
