"""The distillation loss against a float64 reference written from v2's eq. 2, and its gradient."""
import pytest
import torch
import torch.nn.functional as F

from fastclr.losses import distill_loss


def _reference(student, teacher, tau):
    """−(1/N) Σ_i Σ_y P_T(y|x_i; τ) log P_S(y|x_i; τ), element by element in float64."""
    s, t = student.double() / tau, teacher.double() / tau
    total = 0.0
    for i in range(s.shape[0]):
        p_t = torch.exp(t[i] - torch.logsumexp(t[i], 0))
        log_p_s = s[i] - torch.logsumexp(s[i], 0)
        total = total - (p_t * log_p_s).sum()
    return total / s.shape[0]


@pytest.mark.parametrize("n,c", [(1, 2), (37, 10), (5, 1000)])
@pytest.mark.parametrize("tau", [1.0, 0.5, 4.0])
def test_matches_the_reference_and_its_gradient(n, c, tau):
    g = torch.Generator().manual_seed(n * c)
    student = (3 * torch.randn(n, c, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(n, c, generator=g)
    got = distill_loss(student, teacher, tau)
    want = _reference(student, teacher, tau)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.backward()
    # d/ds_i = (softmax(s_i/τ) − softmax(t_i/τ)) / (τ N)
    grad = (F.softmax(student.detach().double() / tau, 1) - F.softmax(teacher.double() / tau, 1)) / (tau * n)
    torch.testing.assert_close(student.grad.double(), grad, rtol=1e-4, atol=1e-7)


def test_is_the_entropy_of_the_teacher_at_its_own_logits_and_larger_elsewhere():
    """Cross-entropy ≥ entropy, with equality only when the student predicts the teacher's distribution."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 7, generator=g)
    p = F.softmax(teacher, 1)
    entropy = -(p * p.log()).sum(1).mean()
    torch.testing.assert_close(distill_loss(teacher + 5.0, teacher), entropy)  # a shift changes no softmax
    assert distill_loss(torch.randn(16, 7, generator=g), teacher) > entropy + 1e-3


def test_the_teacher_gets_no_gradient_and_bf16_inputs_give_an_fp32_loss():
    teacher = torch.randn(4, 3, requires_grad=True)
    student = torch.randn(4, 3, requires_grad=True)
    loss = distill_loss(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_bad_inputs_fail_naming_the_problem():
    with pytest.raises(ValueError, match="same classes"):
        distill_loss(torch.zeros(4, 10), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(torch.zeros(4, 3), torch.zeros(4, 3), temperature=0.0)
