"""What many tests share: paths, the tiny training overrides, configs and trainers, the subprocess environment."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
RECIPES = os.path.join(ROOT, "launchers", "configs")
DEFAULT_RECIPE = os.path.join(RECIPES, "default.yaml")
PRETRAIN = os.path.join(ROOT, "launchers", "pretrain.py")

TINY = ["model.width_mult=0.125", "model.proj_hidden_dim=64", "model.proj_out_dim=32", "train.global_batch_size=64",
        "train.log_every=1", "eval.probe_epochs=0", "eval.baseline=false", "logging.progress=false",
        "logging.tensorboard=false", "checkpoint.every_epochs=0", "eval.max_eval_images=256",
        "train.time_budget_minutes=0"]
"""A CPU-seconds run of the default recipe: narrow network, small batch, no probe, every step logged."""


def tiny_config(run_dir, *extra, recipe=DEFAULT_RECIPE):
    """The default recipe with ``TINY``, writing into ``run_dir``, then ``extra`` overrides."""
    from fastclr.config import load_config

    return load_config(recipe, TINY + [f"logging.dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", *extra])


def make_trainer(cfg, world: int = 1):
    """A Trainer on this process (gloo; the process group of ``world`` ranks must exist when world > 1)."""
    from fastclr import logs, runtime
    from fastclr.config import validate_run
    from fastclr.trainer import Trainer

    plan = validate_run(cfg, world, False)
    rt = runtime.setup("gloo")
    logs.setup(rt.rank)
    return Trainer(cfg, rt, plan)


def subprocess_env(**extra) -> dict:
    """The environment for a child that imports this checkout's fastclr, outside any launcher's world."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def deepspeed_launcher() -> str:
    import shutil

    return shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")


def wait_for(pred, timeout: float, what: str) -> None:
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
