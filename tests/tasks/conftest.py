import pytest


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A short pretraining of the default recipe (tiny network with v2's 3-layer head) in this process: (run folder,
    its final figures). Its checkpoints, backbone.pt and config.yaml are the commands' sources."""
    from tests.helpers import make_trainer, tiny_config

    run = tmp_path_factory.mktemp("pretrained")
    cfg = tiny_config(run, "model.proj_layers=3", "train.epochs=3", "optim.warmup_epochs=1", "eval.probe_epochs=5",
                      "eval.baseline=true")
    trainer = make_trainer(cfg)
    try:
        results = trainer.train()
    finally:
        trainer.close()
    return run, results


def task_args(out, *extra):
    """Overrides that keep a command's run CPU-seconds long and its files in ``out``."""
    return ["logging.progress=false", "logging.tensorboard=false", *extra, f"logging.dir={out}"]
