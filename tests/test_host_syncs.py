"""The training step never makes the host wait for the device between log steps (counted on CPU, tests/syncs.py).

Real steps of the trainer (loader, DeepSpeed engine, loss, all-reduce, LARS, the stop agreement), 1 and 2 gloo
ranks, bf16 autocast, accumulation 1 and 2, the tiled loss and the global-BN layer: 0 syncs per steady-state step.
"""
import pytest

from tests.multiproc import run_ranks
from tests.syncs import HostSyncs

STEPS = 3


def _count(rank, world, accumulation, global_bn_layer, tmp, patch_item=False, memory=False):
    """(syncs counted over STEPS steps, report). Runs in the test process for one rank: the library's functions it
    replaces are put back before it returns, so later tests see the real ones."""
    import fastclr.engine
    import fastclr.losses

    real_norm, real_loss = fastclr.engine.norm_layer, fastclr.losses.nt_xent
    try:
        return _count_patched(world, accumulation, global_bn_layer, tmp, rank, patch_item, memory)
    finally:
        fastclr.engine.norm_layer, fastclr.losses.nt_xent = real_norm, real_loss


def _count_patched(world, accumulation, global_bn_layer, tmp, rank, patch_item, memory):
    import fastclr.engine
    import fastclr.losses
    from fastclr.distributed import global_bn_layer as make_bn
    from tests.helpers import make_trainer, tiny_config

    if global_bn_layer:
        fastclr.engine.norm_layer = lambda cfg, world: make_bn(world)
    if patch_item:
        real = fastclr.losses.nt_xent

        def with_item(*a, **k):
            loss = real(*a, **k)
            loss.item()  # what a careless log line in the step would do
            return loss
        fastclr.losses.nt_xent = with_item
    cfg = tiny_config(f"{tmp}/{world}-{rank}", "train.log_every=1000", "train.epochs=5", "precision.dtype=bf16",
                      "loss.impl=tiled", f"train.micro_batch_size={64 // world // accumulation}",
                      *(("model.momentum=0.99", "loss.memory_size=100") if memory else ()))
    trainer = make_trainer(cfg, world)
    trainer.stop.start_clock()
    for _ in range(2):  # warm-up: first-step allocations, DeepSpeed's lazy set-up
        trainer.window.add(trainer.train_step(trainer.next_micro_batches()))
        trainer.after_step()
    with HostSyncs() as syncs:
        for _ in range(STEPS):
            trainer.window.add(trainer.train_step(trainer.next_micro_batches()))
            assert trainer.after_step() is None
    trainer.close()
    return len(syncs), syncs.report()


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("memory", [False, True], ids=["", "memory"])
def test_no_host_sync_in_steady_state_steps(world, accumulation, memory, tmp_path):
    """SimCLR v2's memory included: the momentum update, the key gather, the queue's negatives and its push."""
    if world == 1:
        n, report = _count(0, 1, accumulation, True, str(tmp_path), False, memory)
    else:
        n, report = run_ranks(_count, world, accumulation, True, str(tmp_path), False, memory)[0]
    assert n == 0, f"{n / STEPS:.1f} host syncs per step ({world} rank(s), accumulation {accumulation}):\n{report}"


def test_a_sync_added_to_the_step_is_found_with_its_call_site(tmp_path):
    n, report = _count(0, 1, 1, False, str(tmp_path), patch_item=True)
    assert n == STEPS, report
    assert "item/bool/float of a tensor at tests/test_host_syncs.py" in report, report
