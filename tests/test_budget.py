"""train.time_budget_minutes: the run's length chosen from its own measured speed."""
import json
import time

import pytest

from fastclr.budget import Costs, decision_step, fit_warmup, total_steps


def test_the_plan_fits_steps_evaluations_and_checkpoints_into_the_budget():
    costs = Costs(seconds_per_step=0.5, evaluation_s=10.0, checkpoint_s=2.0)
    kw = dict(budget_s=600.0, elapsed_s=20.0, step=22, steps_per_epoch=10, costs=costs, final_evaluations=2,
              monitor_every_epochs=0, checkpoint_every_epochs=0, checkpoint_every_steps=0)
    # 600 − 20 − 2·10 − 2 (final save) = 558 s of steps: 1116 more steps.
    assert total_steps(**kw) == 22 + 1116
    # monitors every 10 epochs (100 steps) and checkpoints every 5 (50 steps) between step 22 and the end
    total = total_steps(**{**kw, "monitor_every_epochs": 10, "checkpoint_every_epochs": 5})

    def used(t):
        return 20 + 20 + 2 + (t - 22) * 0.5 + ((t - 1) // 100) * 10 + ((t - 1) // 50) * 2

    assert used(total) <= 600 < used(total + 1)  # fits, and one more step (with what its cadence adds) would not
    assert total_steps(**{**kw, "budget_s": 10.0}) == 23  # over budget already: one step, never zero
    assert decision_step(5) == 5 and decision_step(1000) == 22


def test_a_budget_too_short_for_the_warmup_shortens_it():
    assert fit_warmup(1000, 100, 22) == (1000, 100)  # room for it: the config's warm-up
    assert fit_warmup(157, 156, 22) == (157, 78)  # half of the run, the cosine the other half
    assert fit_warmup(135, 156, 78) == (135, 78)  # re-planned during the warm-up: never before the current step
    assert fit_warmup(30, 156, 22) == (30, 22)
    assert fit_warmup(22, 156, 22) == (23, 22)  # at least one step of cosine


def test_a_short_budget_with_a_long_warmup_still_ends_its_cosine(tmp_path):
    """optim.warmup_epochs longer than the whole budget: the warm-up is shortened (and saved), the LR rises to its
    peak and decays to optim.final_lr at the last step; a restart from the checkpoint rebuilds the same schedule."""
    from fastclr.config import load_config
    from tests.helpers import make_trainer, tiny_config

    cfg = tiny_config(tmp_path, "train.time_budget_minutes=0.25", "optim.warmup_epochs=500", "optim.final_lr=0.01",
                      "eval.every_epochs=0", "train.log_every=1", "train.epochs=1000")
    trainer = make_trainer(cfg)
    trainer.train()
    s = trainer.schedule
    assert s.warmup_steps == trainer.state.warmup_steps  # the decision's step 22 ends it at the earliest
    # Half the length decided then (re-plans after the warm-up move the length by a few %), or, where a re-plan
    # shortened the run while it was still warming up, the epoch boundary it was at
    assert 22 <= s.warmup_steps < s.total_steps
    assert s.warmup_steps <= max(22, 0.6 * s.total_steps) or s.warmup_steps % trainer.steps_per_epoch == 0
    lrs = [s(k) for k in range(s.total_steps)]
    peak = lrs.index(max(lrs))
    assert peak == s.warmup_steps - 1 and lrs[-1] == pytest.approx(0.01, abs=1e-12)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1])) and all(a >= b for a, b in zip(lrs[peak:],
                                                                                                    lrs[peak + 1:]))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r for r in rows if r["kind"] == "train"][-1]["lr"] == pytest.approx(0.01, abs=1e-12)
    saved = load_config(str(tmp_path / "config.yaml"))
    assert saved.optim.warmup_epochs == pytest.approx(s.warmup_steps / trainer.steps_per_epoch)
    again = make_trainer(tiny_config(tmp_path, "train.time_budget_minutes=0.25", "optim.warmup_epochs=500",
                                     "optim.final_lr=0.01", "train.epochs=1000"))
    assert again.resume() and again.schedule == s


def test_train_epochs_caps_what_a_budget_chooses(tmp_path):
    """A budget that would allow many more steps than train.epochs runs train.epochs: the configured length on a
    fast machine, never longer; the whole cosine still ends at optim.final_lr."""
    from tests.helpers import make_trainer, tiny_config

    cfg = tiny_config(tmp_path, "train.time_budget_minutes=5", "optim.warmup_epochs=1", "optim.final_lr=0.01",
                      "eval.every_epochs=0", "train.epochs=2")  # 22 steps per epoch at batch 64
    trainer = make_trainer(cfg)
    t0 = time.monotonic()
    trainer.train()
    assert time.monotonic() - t0 < 150  # inside half of its 5 minutes (~20 s on an idle 2-core CPU)
    assert trainer.total_steps == trainer.state.step == 2 * trainer.steps_per_epoch
    assert trainer.schedule(trainer.total_steps - 1) == pytest.approx(0.01, abs=1e-12)


def test_a_short_budget_ends_its_cosine_on_time(tmp_path):
    """45 s for training, monitors and the final evaluation: the cosine reaches optim.final_lr at the last step and
    the final evaluation ends within ±5% of the budget after train() began (the report and plots that follow are
    not part of the budget: ~1 s here, whatever the run's length)."""
    from fastclr.config import load_config
    from tests.helpers import make_trainer, tiny_config

    cfg = tiny_config(tmp_path, "train.time_budget_minutes=0.75", "optim.warmup_epochs=2", "optim.final_lr=0.01",
                      "eval.every_epochs=4", "train.log_every=5", "train.epochs=1000")
    trainer = make_trainer(cfg)
    finish, ended = trainer.stage.finish, []
    trainer.stage.finish = lambda *a, **k: (ended.append(time.monotonic()), finish(*a, **k))
    t0 = time.monotonic()
    trainer.train()
    wall = ended[0] - t0
    assert abs(wall - 45.0) <= 0.05 * 45.0, wall
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["step"] == trainer.total_steps and train[-1]["lr"] == pytest.approx(0.01, abs=1e-12)
    saved = load_config(str(tmp_path / "config.yaml"))
    assert saved.train.time_budget_minutes == 0 and saved.train.epochs == pytest.approx(
        trainer.total_steps / trainer.steps_per_epoch)
    assert len([r for r in rows if r["kind"] == "eval"]) >= 3  # the decision's evaluation, monitors, the final one
