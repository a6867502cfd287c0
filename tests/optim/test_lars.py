import io
import math

import pytest
import torch

import fastclr.optim.lars as lars_module
from benchmarks.lars import count_dispatched_ops
from fastclr.models import build_backbone
from fastclr.optim import LARS, param_groups


def _reference_step(params, grads, bufs, lars_flags, *, lr, momentum, wd, eta, eps):
    """The published rule, one tensor at a time, with host-side floats (google-research/simclr, classic momentum)."""
    for p, g, v, lars in zip(params, grads, bufs, lars_flags):
        if lars:
            g = g + wd * p
            w_norm = math.sqrt(float((p * p).sum()))
            g_norm = math.sqrt(float((g * g).sum()))
            trust = eta * w_norm / (g_norm + eps) if (w_norm > 0 and g_norm > 0) else 1.0
        else:
            trust = 1.0
        v.copy_(momentum * v + (lr * trust) * g)
        p.copy_(p - v)


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3, 3, 5), (13, 11), (2, 1, 1, 1), (11,), (1,)]  # last two: a bias and a BN-like scalar
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    params[2].zero_()  # a zero weight: its trust ratio must fall back to 1
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(5)]
    grads[1][1].zero_()  # a zero gradient (with weight decay, g' is still wd·w)
    return params, grads


# CPU_CHUNK_BYTES: the default (one chunk per group here), 1200 B (the 2520-B tensor alone, then the next two
# together), 1 B (one tensor per chunk).
@pytest.mark.parametrize("foreach,chunk_bytes", [(True, None), (True, 1200), (True, 1), (False, None)])
def test_matches_reference_over_five_steps(foreach, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:
        monkeypatch.setattr(lars_module, "CPU_CHUNK_BYTES", chunk_bytes)
    params, grads = _problem(0)
    lrs, momentum, wd, eta, eps = [0.4, 1.3, 2.0, 0.7, 0.05], 0.9, 1e-3, 0.01, 1e-9
    ours = [p.clone().requires_grad_(True) for p in params]
    opt = LARS([{"params": ours[:3]}, {"params": ours[3:], "lars": False}], lr=lrs[0], momentum=momentum,
               weight_decay=wd, trust_coefficient=eta, eps=eps, foreach=foreach)
    ref = [p.clone() for p in params]
    ref_bufs = [torch.zeros_like(p) for p in params]
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(ours, grads[step]):
            p.grad = g.clone()
        opt.step()
        _reference_step(ref, grads[step], ref_bufs, [True] * 3 + [False] * 2, lr=lr, momentum=momentum, wd=wd,
                        eta=eta, eps=eps)
        for p, r in zip(ours, ref):
            torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12)
    for p, b in zip(ours, ref_bufs):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=0, atol=1e-12)
        assert torch.isfinite(p).all()


def test_one_step_by_hand():
    # w = (3, 4): ‖w‖ = 5. g = (0.6, 0.8), wd = 0.1 → g' = (0.9, 1.2), ‖g'‖ = 1.5.
    # trust = 0.001 · 5 / 1.5 = 1/300; v = 0.6 · (1/300) · g' = (0.0018, 0.0024); w ← (2.9982, 3.9976).
    w = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)  # lars=False: v = lr·g, no decay
    opt = LARS([{"params": [w]}, {"params": [b], "lars": False}], lr=0.6, momentum=0.9, weight_decay=0.1,
               trust_coefficient=0.001, eps=0.0)
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    b.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([2.9982, 3.9976], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], torch.tensor([0.0018, 0.0024], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(b.detach(), torch.tensor([0.7, 2.6], dtype=torch.float64), rtol=0, atol=1e-15)
    # Second step, same gradient: w = 0.9994·(3, 4), g' = 0.29994·(3, 4), trust = 0.001·4.997/1.4997,
    # v = 0.9·v + 0.6·trust·g'.
    opt.step()
    trust = 0.001 * 4.997 / 1.4997
    v = [0.9 * 0.0018 + 0.6 * trust * 0.89982, 0.9 * 0.0024 + 0.6 * trust * 1.19976]
    torch.testing.assert_close(w.detach(), torch.tensor([2.9982 - v[0], 3.9976 - v[1]], dtype=torch.float64),
                               rtol=0, atol=1e-14)


def test_default_eps_stays_within_a_hair_of_the_published_rule():
    w = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    LARS([w], lr=0.6, weight_decay=0.1).step()
    torch.testing.assert_close(w.detach(), torch.tensor([2.9982, 3.9976], dtype=torch.float64), rtol=0, atol=1e-11)


@pytest.mark.parametrize("foreach", [True, False])
def test_zero_weight_and_zero_gradient_use_trust_one(foreach):
    w0 = torch.zeros(4, 3, requires_grad=True)  # ‖w‖ = 0, ‖g‖ > 0 → plain momentum SGD step
    g0 = torch.arange(12.0).reshape(4, 3) - 5
    w1 = torch.ones(5, requires_grad=True)  # ‖g'‖ = 0 (no decay, zero grad) → no movement, no NaN
    w2 = torch.zeros(3, 2, requires_grad=True)  # both zero
    opt = LARS([w0, w1, w2], lr=0.5, momentum=0.9, weight_decay=0.0, foreach=foreach)
    w0.grad, w1.grad, w2.grad = g0.clone(), torch.zeros(5), torch.zeros(3, 2)
    opt.step()
    torch.testing.assert_close(w0.detach(), -0.5 * g0)
    assert torch.equal(w1.detach(), torch.ones(5)) and torch.equal(w2.detach(), torch.zeros(3, 2))
    for p in (w0, w1, w2):
        assert torch.isfinite(opt.state[p]["momentum_buffer"]).all()


def _resnet_step(foreach, steps=3):
    torch.manual_seed(0)
    model = build_backbone("resnet18", width_mult=0.125, cifar_stem=True).double()
    opt = LARS(param_groups(model, 1e-4), lr=2.5, trust_coefficient=0.02, foreach=foreach)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    return [p.detach() for p in model.parameters()], opt


@pytest.mark.parametrize("chunk_bytes", [None, 64 << 10])
def test_foreach_equals_per_tensor_loop(chunk_bytes, monkeypatch):
    if chunk_bytes is not None:  # ~1.4 MB of fp64 parameters: about 20 chunks
        monkeypatch.setattr(lars_module, "CPU_CHUNK_BYTES", chunk_bytes)
    fast, _ = _resnet_step(True)
    slow, _ = _resnet_step(False)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_chunks_partition_the_list_greedily():
    g = torch.Generator().manual_seed(2)
    sizes = torch.randint(1, 400, (57,), generator=g).tolist() + [5000, 3, 4999]
    params = [torch.empty(n) for n in sizes]  # 4 bytes per element
    budget = 4 * 600
    chunks = lars_module._chunks(params, budget)
    assert [i for c in chunks for i in range(len(params))[c]] == list(range(len(params)))
    nbytes = [sum(4 * n for n in sizes[c]) for c in chunks]
    for c, b in zip(chunks, nbytes):
        assert b <= budget or len(sizes[c]) == 1  # a tensor above the budget travels alone
    for c, nxt in zip(chunks, chunks[1:]):  # greedy: the next tensor did not fit
        assert sum(4 * n for n in sizes[c]) + 4 * sizes[nxt.start] > budget
    assert lars_module._chunks(params, None) == [slice(0, len(params))]


def test_step_never_reads_a_tensor_on_the_host(monkeypatch):
    torch.manual_seed(0)
    model = build_backbone("resnet18", width_mult=0.125, cifar_stem=True).to(memory_format=torch.channels_last)
    opt = LARS(param_groups(model, 1e-6), lr=1.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    def host_read(*args, **kwargs):
        raise AssertionError("host synchronization inside LARS.step")

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    opt.step()
    opt.step()
    monkeypatch.undo()
    # Momentum buffers follow the parameters' channels_last layout (the multi-tensor fast path needs equal strides).
    conv = model.layer1[0].conv1.weight
    assert opt.state[conv]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)


# Operator calls are counted by the benchmark's own counter (benchmarks/lars.py), so that this test guards exactly the
# figure the benchmark reports; it is a few lines with no dependency beyond torch. The gradients sit in flat buckets,
# as the trainer's all-reduce keeps them (fastclr.allreduce): the non-finite guard sanitizes those few tensors.
def _dispatches_per_step(arch, foreach):
    from fastclr.allreduce import GradientBuckets

    torch.manual_seed(0)
    model = build_backbone(arch, width_mult=0.125, cifar_stem=True).to(memory_format=torch.channels_last)
    opt = LARS(param_groups(model, 1e-4), lr=1.0, foreach=foreach)
    buckets = GradientBuckets(model.parameters(), world_size=1, bucket_mb=1e6, first_bucket_mb=1e6)  # one bucket
    opt.grad_buffers = buckets.flat
    buckets.prepare()
    for p in model.parameters():
        p.grad.copy_(torch.randn_like(p))
    opt.step()  # the first step also creates the momentum buffers: count a steady-state step
    return count_dispatched_ops(opt.step), len(list(model.parameters()))


def test_foreach_dispatches_at_most_a_tenth_of_the_loop():
    fast, n = _dispatches_per_step("resnet18", True)
    slow, _ = _dispatches_per_step("resnet18", False)
    assert n >= 50
    assert slow >= 3 * n  # the loop issues several calls per tensor: the counter sees them
    assert fast * 10 <= slow, (fast, slow)


def test_foreach_dispatch_count_does_not_grow_with_the_number_of_tensors():
    # Both models' weights fit in one CPU_CHUNK_BYTES chunk; with more chunks, each adds six calls, not six per tensor.
    small, n_small = _dispatches_per_step("resnet18", True)
    large, n_large = _dispatches_per_step("resnet50", True)
    assert n_large > 2 * n_small and large == small


@pytest.mark.parametrize("foreach", [True, False])
def test_step_leaves_the_decayed_gradient_in_grad(foreach):
    # Documented contract: lars=True groups with weight decay get g' = g + wd·w written into .grad; others keep g.
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    gw, gb = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    pw, pb = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    pw.grad, pb.grad = gw.clone(), gb.clone()
    LARS([{"params": [pw], "weight_decay": 0.25}, {"params": [pb], "lars": False}], lr=0.1,
         foreach=foreach).step()
    torch.testing.assert_close(pw.grad, gw + 0.25 * w, rtol=0, atol=1e-15)
    assert torch.equal(pb.grad, gb)


def test_params_without_grad_are_skipped():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, 2, requires_grad=True)
    opt = LARS([a, b], lr=0.1, weight_decay=0.5)
    b.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(a.detach(), torch.ones(3)) and a not in opt.state
    assert not torch.equal(b.detach(), torch.ones(2, 2))


def test_state_dict_resume_continues_identically():
    params, grads = _problem(3)

    def make(ps):
        return LARS([{"params": ps[:3]}, {"params": ps[3:], "lars": False}], lr=0.3, weight_decay=1e-2,
                    trust_coefficient=0.02)

    def run(ps, opt, steps):
        for step in steps:
            for p, g in zip(ps, grads[step]):
                p.grad = g.clone()
            opt.step()

    straight = [p.clone().requires_grad_(True) for p in params]
    run(straight, make(straight), range(5))
    first = [p.clone().requires_grad_(True) for p in params]
    opt = make(first)
    run(first, opt, range(2))
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)  # a checkpoint after two steps ...
    blob.seek(0)
    second = [p.detach().clone().requires_grad_(True) for p in first]
    opt = make(second)  # ... restored into a fresh optimizer
    opt.load_state_dict(torch.load(blob, weights_only=True))
    run(second, opt, range(2, 5))
    for a, b in zip(straight, second):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("kwargs,field", [(dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"),
                                          (dict(weight_decay=-1e-6), "weight_decay"),
                                          (dict(trust_coefficient=0.0), "trust_coefficient"), (dict(eps=-1.0), "eps")])
def test_invalid_hyperparameters_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LARS([torch.ones(2, requires_grad=True)], **({"lr": 0.1} | kwargs))


def test_fp16_loss_scaler_steps_through_lars_on_the_device():
    """torch.amp.GradScaler hands LARS the scale and the overflow flag (``_step_supports_amp_scaling``): a finite
    step equals the unscaled step, an overflowing one leaves parameters and momentum and halves the scale, and
    neither reads a value on the host."""
    from tests.syncs import HostSyncs

    def setup(scale):
        torch.manual_seed(0)
        w = torch.randn(6, 5, requires_grad=True)
        b = torch.randn(5, requires_grad=True)
        opt = LARS([{"params": [w]}, {"params": [b], "lars": False}], lr=0.5, weight_decay=1e-3)
        return w, b, opt

    gw, gb = torch.randn(6, 5), torch.randn(5)
    w0, b0, plain = setup(1.0)
    w0.grad, b0.grad = gw.clone(), gb.clone()
    plain.step()

    w, b, opt = setup(1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # what scaling the loss does first: creates the scale tensor
    w.grad, b.grad = gw * 1024.0, gb * 1024.0
    with HostSyncs() as syncs:
        scaler.step(opt)
        scaler.update()
    assert len(syncs) == 0, syncs.report()
    torch.testing.assert_close(w.detach(), w0.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach(), b0.detach(), rtol=1e-6, atol=1e-7)
    assert bool(opt.step_ok) and scaler.get_scale() == 1024.0

    before = (w.detach().clone(), b.detach().clone(), opt.state[w]["momentum_buffer"].clone())
    w.grad, b.grad = gw * 1024.0, gb * 1024.0
    w.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert not bool(opt.step_ok) and scaler.get_scale() == 512.0
    assert torch.equal(w.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert torch.equal(opt.state[w]["momentum_buffer"], before[2])
