import math

import numpy as np
import pytest

from fastclr.optim import lr_at, scaled_lr
from fastclr.optim.schedule import Schedule


def test_simclr_scaling_rules_at_4096():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8, rel=1e-12)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8, rel=1e-12)
    assert scaled_lr(0.3, 256, "linear") == pytest.approx(0.3, rel=1e-12)
    assert scaled_lr(0.075, 100, "sqrt") == pytest.approx(0.75, rel=1e-12)
    assert scaled_lr(1.0, np.int64(512), "linear") == pytest.approx(2.0)


@pytest.mark.parametrize("args,field", [((0.3, 4096, "cubic"), "cubic"), ((0.3, 0, "linear"), "batch_size"),
                                        ((0.3, 64.0, "sqrt"), "batch_size"), ((-0.1, 256, "linear"), "base_lr")])
def test_scaling_refuses_bad_arguments(args, field):
    with pytest.raises(ValueError, match=field):
        scaled_lr(*args)


def test_warmup_then_cosine_endpoints_and_shape():
    total, warmup, peak, final = 100, 10, 2.0, 0.02
    lrs = [lr_at(s, total_steps=total, warmup_steps=warmup, peak_lr=peak, final_lr=final) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup)  # the first step already moves
    assert lrs[warmup - 1] == peak  # the last warmup step is exactly the peak
    assert lrs[-1] == pytest.approx(final, abs=1e-15)  # the last step is the final LR
    warm = np.array(lrs[:warmup])
    np.testing.assert_allclose(np.diff(warm), peak / warmup, rtol=1e-12)  # linear
    assert (np.diff(np.array(lrs[warmup - 1:])) < 0).all()  # strictly decreasing after the peak
    # Cosine from step 9 (peak) to step 99 (final): halfway (step 54) is the midpoint, a quarter in is 85.4 %.
    assert lrs[54] == pytest.approx((peak + final) / 2, rel=1e-12)
    assert lrs[9 + 90 // 3] == pytest.approx(final + (peak - final) * 0.5 * (1 + math.cos(math.pi / 3)), rel=1e-12)
    # Clamped after the end.
    assert lr_at(10 ** 6, total_steps=total, warmup_steps=warmup, peak_lr=peak, final_lr=final) == pytest.approx(final)


def test_pure_function_of_the_step():
    kw = dict(total_steps=37, warmup_steps=5, peak_lr=1.3, final_lr=0.0)
    forward = [lr_at(s, **kw) for s in range(37)]
    backward = [lr_at(s, **kw) for s in reversed(range(37))][::-1]
    assert forward == backward


def test_degenerate_lengths():
    assert lr_at(0, total_steps=50, warmup_steps=0, peak_lr=1.0) == 1.0  # no warmup: start at peak
    assert lr_at(49, total_steps=50, warmup_steps=0, peak_lr=1.0) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(0, total_steps=1, warmup_steps=0, peak_lr=0.7) == 0.7  # one step: no room to decay
    # Warmup filling all but the last step: peak at step 3, final at step 4.
    lrs = [lr_at(s, total_steps=5, warmup_steps=4, peak_lr=1.0, final_lr=0.1) for s in range(5)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.1])


@pytest.mark.parametrize("step,kw,field", [
    (0, dict(total_steps=0, warmup_steps=0, peak_lr=1.0), "total_steps"),
    (0, dict(total_steps=10, warmup_steps=10, peak_lr=1.0), "warmup_steps"),
    (0, dict(total_steps=10, warmup_steps=-1, peak_lr=1.0), "warmup_steps"),
    (-1, dict(total_steps=10, warmup_steps=2, peak_lr=1.0), "step"),
    (1.5, dict(total_steps=10, warmup_steps=2, peak_lr=1.0), "step"),
    (0, dict(total_steps=10, warmup_steps=2, peak_lr=1.0, final_lr=2.0), "final_lr"),
    (0, dict(total_steps=10, warmup_steps=2, peak_lr=1.0, final_lr=-0.1), "final_lr"),
])
def test_schedule_refuses_bad_arguments(step, kw, field):
    with pytest.raises(ValueError, match=field):
        lr_at(step, **kw)


def test_a_rescaled_cosine_is_continuous_and_ends_at_the_final_lr():
    """A time budget's re-planning: steps up to the bend as before, the rest of the same curve in the new length."""
    import random

    rng = random.Random(11)
    for _ in range(50):
        total, warmup = rng.randint(20, 400), rng.randint(1, 10)
        s = Schedule(total, warmup, peak_lr=rng.uniform(0.1, 5), final_lr=rng.uniform(0, 0.05))
        chain = [s]
        for _ in range(rng.randint(1, 4)):  # several re-plans in a row, longer or shorter
            cur = chain[-1]
            bend = rng.randint(max(cur.bend_step, warmup), cur.total_steps - 2)
            new = cur.rescaled(bend, rng.randint(bend + 2, 2 * cur.total_steps))
            assert new(bend) == pytest.approx(cur(bend), rel=1e-12)  # continuous where it takes over
            if new.total_steps >= cur.total_steps:  # a longer remainder: never below the old curve
                assert all(new(t) >= cur(t) - 1e-12 for t in range(bend, cur.total_steps))
            chain.append(new)
        last = chain[-1]
        lrs = [last(t) for t in range(last.bend_step, last.total_steps + 3)]
        assert all(a >= b - 1e-12 for a, b in zip(lrs, lrs[1:]))  # still decaying
        assert last(last.total_steps - 1) == pytest.approx(s.final_lr, abs=1e-12) and lrs[-1] == s.final_lr
        assert [last(t) for t in range(warmup)] == [s(t) for t in range(warmup)]  # the warm-up untouched
    with pytest.raises(ValueError, match="warm-up"):
        Schedule(100, 10, 1.0, 0.0).rescaled(5, 200)
