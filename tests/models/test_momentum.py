"""SimCLR v2's memory: the momentum schedule, the EMA rule and the FIFO queue against plain references."""
import collections
import math

import pytest
import torch

from fastclr.models import ProjectionHead, SimCLRModel, build_backbone
from fastclr.models.momentum import MomentumMemory, momentum_at


def _model(seed):
    torch.manual_seed(seed)
    backbone = build_backbone("resnet18", width_mult=0.125, cifar_stem=True)
    return SimCLRModel(backbone, ProjectionHead(backbone.feature_dim, 16, 8))


def test_momentum_rises_from_base_to_one_along_a_half_cosine():
    for step, total, base in ((0, 100, 0.99), (50, 100, 0.99), (100, 100, 0.9), (150, 100, 0.9), (7, 13, 0.996)):
        want = 1 - (1 - base) * (math.cos(math.pi * min(step, total) / total) + 1) / 2
        assert momentum_at(step, total, base) == pytest.approx(want, abs=1e-15)
    assert momentum_at(0, 10, 0.99) == pytest.approx(0.99) and momentum_at(10, 10, 0.99) == 1.0
    with pytest.raises(ValueError, match="momentum"):
        momentum_at(0, 10, 1.0)


def test_ema_rule_and_the_copy_starts_equal():
    online = _model(0)
    memory = MomentumMemory(online, _model(1), size=5, dim=8)
    for (_, a), (_, b) in zip(online.state_dict().items(), memory.network.state_dict().items()):
        assert torch.equal(a, b)  # the copy starts as the online network
    assert not any(p.requires_grad for p in memory.network.parameters())
    before = [p.clone() for p in memory.network.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    memory.update(list(online.parameters()), 0.9)
    for xi, xi0, theta in zip(memory.network.parameters(), before, online.parameters()):
        torch.testing.assert_close(xi, 0.9 * xi0 + 0.1 * theta, rtol=1e-6, atol=1e-7)


def test_queue_is_a_fifo_of_the_newest_keys():
    memory = MomentumMemory(_model(0), _model(0), size=7, dim=3)
    reference = collections.deque(maxlen=7)
    pushed = 0
    assert memory.negatives(pushed) is None
    for k in (3, 2, 4, 1, 9, 5):  # wraps, and one push larger than the queue
        keys = torch.randn(k, 3)
        pushed = memory.push(keys, pushed)
        reference.extend(keys)
        got = memory.negatives(pushed)
        assert got.shape[0] == min(pushed, 7)
        # The queue holds exactly the newest min(pushed, 7) keys; which slot each sits in does not matter to the loss.
        assert sorted(map(tuple, got.tolist())) == sorted(tuple(r.tolist()) for r in reference)
