"""NesterovSGD: torch.optim.SGD(nesterov=True)'s update, and a non-finite step skipped on the device."""
import pytest
import torch

from fastclr.optim import NesterovSGD


def _params(seed, shapes=((7, 5), (3,), (4, 3, 3, 3))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_matches_torch_sgd_nesterov_over_steps_with_changing_lr(weight_decay):
    ours, ref = _params(1), _params(1)
    opt = NesterovSGD([{"params": ours}], lr=0.1, momentum=0.9, weight_decay=weight_decay)
    torch_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        lr = 0.1 * (step + 1) / 6
        for o in (opt, torch_opt):
            o.param_groups[0]["lr"] = lr
        for a, b in zip(ours, ref):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
        assert bool(opt.step_ok)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_non_finite_gradient_skips_the_step_and_keeps_momentum():
    params = _params(3)
    opt = NesterovSGD([{"params": params}], lr=0.05, momentum=0.9, weight_decay=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[0] = float("nan")
    opt.step()
    assert not bool(opt.step_ok)
    for p, b, v in zip(params, before, bufs):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["momentum_buffer"], v)
