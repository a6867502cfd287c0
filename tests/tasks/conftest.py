import pytest


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A short pretraining of the default recipe (tiny network with v2's 3-layer head) in this process: (run folder,
    its final figures). Its checkpoints, backbone.pt and config.yaml are the commands' sources. 20 epochs (~45 s on
    2 cores): 3 left the encoder below the random-init one (kNN 62% vs 71%), where no stage can show what
    pretraining bought; 20 reach 87%, and linear (63% vs 41%) and finetune (30% vs 11%) clear random init."""
    from tests.helpers import make_trainer, tiny_config

    run = tmp_path_factory.mktemp("pretrained")
    cfg = tiny_config(run, "model.proj_layers=3", "train.epochs=20", "optim.warmup_epochs=1", "eval.probe_epochs=5",
                      "eval.baseline=true")
    trainer = make_trainer(cfg)
    try:
        results = trainer.train()
    finally:
        trainer.close()
    assert results["knn_top1"] > results["baseline_knn_top1"] + 5, results  # a source worth starting from
    return run, results


def task_args(out, *extra):
    """Overrides that keep a command's run CPU-seconds long and its files in ``out``."""
    return ["logging.progress=false", "logging.tensorboard=false", *extra, f"logging.dir={out}"]


@pytest.fixture(scope="session")
def teacher(pretrained, tmp_path_factory):
    """A fine-tuned network (``classifier.pt``) of the pretrained fixture: distillation's teacher."""
    from fastclr.tasks.finetune import run_finetune

    run, _ = pretrained
    out = tmp_path_factory.mktemp("teacher")
    run_finetune(str(run / "ckpt"), overrides=task_args(out, "finetune.epochs=6", "finetune.global_batch_size=32"))
    return out / "finetune" / "classifier.pt"
