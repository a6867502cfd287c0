"""The supervised stage on the trainer every stage shares: K ranks × B/K images train what one process trains on B
images; evaluation counts are summed over the ranks; the batch arithmetic and the masked cross-entropy."""
import pytest
import torch

from fastclr.config import ConfigError, batch_plan, load_config
from fastclr.stages.supervised import cross_entropy
from tests.multiproc import run_ranks

GLOBAL_BATCH, STEPS = 16, 3
_CFG = ["model.width_mult=0.125", "model.proj_hidden_dim=16", "model.proj_out_dim=8", "model.proj_layers=3",
        "data.image_size=16", "precision.dtype=fp32", "logging.progress=false", "logging.tensorboard=false",
        f"finetune.global_batch_size={GLOBAL_BATCH}", "finetune.base_lr=0.05", "finetune.weight_decay=1e-4",
        "eval.max_eval_images=0"]


def _batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def _finetune(rank, world, batches, out_dir, optimizer):
    from fastclr import runtime
    from fastclr.data import build_source
    from fastclr.distributed import global_bn_layer
    from fastclr.models.classifier import classifier_from
    from fastclr.stages.supervised import Supervised, evaluate
    from fastclr.tasks import common
    from fastclr.trainer import Trainer

    cfg = load_config("default", _CFG + [f"logging.dir={out_dir}/{world}-{rank}", f"finetune.optimizer={optimizer}",
                                         f"checkpoint.dir={out_dir}/{world}-{rank}/ckpt"])
    rt = runtime.Runtime(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    plan = batch_plan(cfg, world, "finetune")
    # The cross-rank BN layer on both sides (a group of one in the one-process run): the same BN arithmetic, so
    # only the data-parallel decomposition differs.
    encoder = common.pretrained_model(None, cfg, global_bn_layer(world), random_init=True)
    model = classifier_from(encoder, 10, 1)
    source = build_source(cfg.data, "train")
    run = Trainer(cfg, rt, plan, Supervised(cfg, "finetune", model, source, common.classification_loss,
                                            f"{out_dir}/{world}-{rank}"))
    n = GLOBAL_BATCH // world
    losses = []
    for x, y in batches:
        loss = run.train_step([(x[rank * n:(rank + 1) * n].contiguous(memory_format=torch.channels_last),
                                y[rank * n:(rank + 1) * n])])
        if world > 1:
            torch.distributed.all_reduce(loss)
        losses.append(loss.item() / world)
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
            "eval": evaluate(run.model, run.stage.test_loader(rt), rt.device)}


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_two_ranks_train_and_score_what_one_rank_does(tmp_path, optimizer):
    batches = _batches()
    one = run_ranks(_finetune, 1, batches, str(tmp_path), optimizer)[0]
    two = run_ranks(_finetune, 2, batches, str(tmp_path), optimizer)
    for a, b in zip(one["losses"], two[0]["losses"]):
        assert abs(a - b) < 1e-5, (one["losses"], two[0]["losses"])
    for k, v in one["params"].items():
        torch.testing.assert_close(two[0]["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        assert torch.equal(two[0]["params"][k], two[1]["params"][k]), k
    assert two[0]["eval"] == two[1]["eval"] and two[0]["eval"]["test_images"] == 360
    assert abs(two[0]["eval"]["top1"] - one["eval"]["top1"]) <= 100 / 360  # one image may flip at most


def test_cross_entropy_ignores_unlabelled_samples_without_nan():
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([1, -1, 3, -1, 0, 2])
    keep = labels >= 0
    torch.testing.assert_close(cross_entropy(logits, labels), torch.nn.functional.cross_entropy(logits[keep],
                                                                                              labels[keep]))
    none = cross_entropy(logits, torch.full((6,), -1))
    assert none.item() == 0.0
    none.backward()
    assert torch.isfinite(logits.grad).all()


def test_batch_arithmetic_fails_naming_the_task_field():
    cfg = load_config(None, ["finetune.global_batch_size=30", "finetune.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="'finetune.global_batch_size'.*world size 4"):
        batch_plan(cfg, 4, "finetune")
    with pytest.raises(ConfigError, match="'finetune.micro_batch_size'"):
        batch_plan(cfg, 3, "finetune")
    plan = batch_plan(load_config(None, ["linear.global_batch_size=64", "linear.micro_batch_size=8"]), 2, "linear")
    assert (plan.global_batch, plan.micro_batch, plan.accumulation) == (64, 8, 4)
