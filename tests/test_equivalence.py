"""Data-parallel exactness: K ranks × B/K images compute what one process computes on B images.

Fixed views are fed (augmentation randomness is not what this checks); the trainer's own step runs on DeepSpeed over
gloo with LARS, global BN and cross-replica negatives, in fp32.
"""
import os

import pytest
import torch

from tests.multiproc import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH, STEPS = 32, 3
BASE_LR = 0.3  # peak LR 0.3·32/256 = 0.0375 (linear scaling)


def _views():
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g))
            for _ in range(STEPS)]


def _train_fixed(rank, world, global_bn, views, out_dir, base_lr=None, extra=()):
    from fastclr.config import load_config
    from tests.helpers import make_trainer

    cfg = load_config(os.path.join(ROOT, "launchers", "configs", "default.yaml"), [
        "model.width_mult=0.125", "model.proj_hidden_dim=32", "model.proj_out_dim=16", "data.image_size=16",
        f"train.global_batch_size={GLOBAL_BATCH}", f"distributed.global_bn={global_bn}", "precision.dtype=fp32",
        "optim.warmup_epochs=0", "train.time_budget_minutes=0", f"optim.base_lr={base_lr or BASE_LR}",
        "logging.progress=false", "logging.tensorboard=false",
        f"logging.dir={out_dir}/{world}-{rank}", f"checkpoint.dir={out_dir}/{world}-{rank}/ckpt", *extra])
    trainer = make_trainer(cfg, world)
    first_grads = {}

    def record(opt, args, kwargs):  # the all-reduced gradients the first LARS step sees
        if not first_grads:
            first_grads.update({k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(record)
    n = GLOBAL_BATCH // world
    losses = []
    for view_a, view_b in views:
        local = [v[rank * n:(rank + 1) * n].contiguous(memory_format=torch.channels_last) for v in (view_a, view_b)]
        loss = trainer.train_step([tuple(local)])
        if world > 1:
            torch.distributed.all_reduce(loss)  # each rank's loss is the mean over its anchors
        losses.append(loss.item() / world)
    return {"losses": losses, "grads": first_grads,
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}}


def _train_same_bn_arithmetic(rank, world, global_bn, views, out_dir, base_lr=None, extra=()):
    """The one-process run with the global-BN layer (a group of one) instead of ATen's batch norm, so that both sides
    compute BN statistics the same way and only the data-parallel decomposition differs."""
    from fastclr.distributed import global_bn_layer
    import fastclr.engine

    fastclr.engine.norm_layer = lambda cfg, world: global_bn_layer(world)
    return _train_fixed(rank, world, global_bn, views, out_dir, base_lr, extra)


def _run(world, global_bn, tmp_path, base_lr=None, fn=_train_fixed, extra=()):
    return run_ranks(fn, world, global_bn, _views(), str(tmp_path), base_lr, tuple(extra))[0]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _flat(params):
    return torch.cat([v.double().flatten() for k, v in sorted(params.items()) if v.is_floating_point()])


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_k_ranks_equal_one_process(world, tmp_path):
    one = _run(1, True, tmp_path)
    many = _run(world, True, tmp_path)
    torch.testing.assert_close(torch.tensor(many["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    # Every tensor's gradient of the first step. BN weights and biases get sums over all positions that nearly cancel
    # (their norms are ~1e-3 of a conv weight's), so fp32 summation order alone moves them by up to ~2e-5 relative.
    for k, g in one["grads"].items():
        assert _rel(many["grads"][k], g) < 1e-4, k
    # After 3 LARS steps every conv/linear weight is within 1e-5. BN weights/biases are not held to 1e-5 after 3 steps,
    # and cannot be in fp32: in this very setting one ReLU input of layer2.1 lies within rounding distance of zero at
    # the third step (1 of 32,768 elements; the BN outputs of the two runs differ by ~1e-5 there), so its mask flips
    # between the runs. That one element changes Σdy of its BN bias (a near-cancelling sum) and, through the backward
    # pass, every gradient upstream by ~2e-3 relative; BN biases, small after 3 steps, end up to 9e-4 apart while the
    # conv weights stay within 1e-5. Swapping the two views in one process (the same mathematics, another summation
    # order) happens to flip nothing and agrees within 5e-6. A threshold event, not a property of the data-parallel
    # implementation (first-step gradients of every tensor, BN included, are checked above): ATen's CPU batch norm in
    # the one-process run has ~4e-6 absolute output error against float64 where the global-BN arithmetic has 7e-7, and
    # with that arithmetic on both sides every parameter agrees within 1e-5 (the test below).
    for k, p in one["params"].items():
        if k.endswith("weight") and p.dim() > 1:
            assert _rel(many["params"][k], p) < 1e-5, k
    # Not vacuous: the parameters moved, and local BN statistics give measurably different results.
    assert one["losses"][0] != one["losses"][-1]
    local_bn = _run(world, False, tmp_path)
    assert _rel(_flat(local_bn["params"]), _flat(one["params"])) > 1e-4
    assert max(_rel(local_bn["grads"][k], g) for k, g in one["grads"].items()) > 1e-2


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_k_ranks_equal_one_process_with_the_same_bn_arithmetic(world, tmp_path):
    """With the BN statistics computed the same way on both sides (var_mean, fp64 merge), every parameter — BN weights
    and biases included — and the loss agree within 1e-5 after 3 LARS steps."""
    one = _run(1, True, tmp_path / "one", fn=_train_same_bn_arithmetic)
    many = _run(world, True, tmp_path / "many")
    torch.testing.assert_close(torch.tensor(many["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    for k, p in one["params"].items():  # parameters and BN running statistics
        if p.is_floating_point():
            assert _rel(many["params"][k], p) < 1e-5, k
    assert one["losses"][0] != one["losses"][-1]


def test_two_ranks_with_the_memory_queue_equal_one_process(tmp_path):
    """SimCLR v2's memory on 2 ranks: the gathered keys make the queue identical on every rank and equal to the one
    process's, so losses, parameters, the momentum encoder and the queue agree within the test above's 1e-5."""
    memory = ("model.momentum=0.9", "loss.memory_size=40")  # 64 keys a step: the queue wraps at the second push
    one = _run(1, True, tmp_path / "one", fn=_train_same_bn_arithmetic, extra=memory)
    many = _run(2, True, tmp_path / "many", extra=memory)
    torch.testing.assert_close(torch.tensor(many["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    for k, p in one["params"].items():
        if p.is_floating_point():
            assert _rel(many["params"][k], p) < 1e-5, k
    assert any(k.startswith("memory.network.") for k in one["params"]) and "memory.queue" in one["params"]
    assert one["params"]["memory.queue"].abs().sum() > 0  # the queue was used
