"""The Triton NT-Xent kernels against the independent fp64 references.

Without CUDA they run in Triton's interpreter, which must be switched on before the kernels are defined — hence the
environment variable is set at import of this file, before anything imports the kernel module. The interpreter runs
programs one at a time, so shapes stay small; N is never a multiple of the block sizes (32–128), and the autotuner
times its configs with the kernel module's CPU timer.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastclr.losses import nt_xent, ntxent_tiled  # noqa: E402
from tests.ntxent_reference import reference, scaled_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 inputs: the kernel's dots run as tf32x3 on GPU (fp32-accurate) and in fp32 in the interpreter; the online
# log-sum-exp and the three-kernel backward round differently from a single softmax, observed ≤ 2e-6 here.
FP32_TOL = 1e-5
# bf16 inputs: the normalized embeddings themselves are rounded to 8 bits of mantissa (relative 2^-9 ≈ 2e-3 each), so
# logits move by ~2e-3/τ; graded against the fp64 loss of the *unrounded* inputs, 2e-2 relative covers τ ≥ 0.1.
BF16_TOL = 2e-2


def _case(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=g)
    return z_a, z_a + 0.7 * torch.randn(n, d, generator=g)


def _run(z_a, z_b, tau, dtype=torch.float32):
    a = z_a.to(DEVICE, dtype).requires_grad_(True)
    b = z_b.to(DEVICE, dtype).requires_grad_(True)
    loss = nt_xent(a, b, tau, impl="triton")
    loss.backward()
    return loss.item(), a.grad.float().cpu(), b.grad.float().cpu()


@pytest.mark.parametrize("n, d, tau", [(1, 3, 0.1), (2, 64, 0.05), (7, 96, 0.5), (37, 128, 0.1), (70, 3, 0.05)])
def test_matches_fp64_reference(n, d, tau):
    z_a, z_b = _case(n, d, 100 * n + d)
    ref_loop, _, grad_a, grad_b = reference(z_a, z_b, tau)
    loss, ga, gb = _run(z_a, z_b, tau)
    assert abs(loss - ref_loop) / max(abs(ref_loop), 1.0) <= FP32_TOL
    assert scaled_error(ga, grad_a) <= FP32_TOL and scaled_error(gb, grad_b) <= FP32_TOL


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_bf16_inputs(tau):
    z_a, z_b = _case(29, 64, 7)
    ref_loop, _, grad_a, grad_b = reference(z_a, z_b, tau)
    loss, ga, gb = _run(z_a, z_b, tau, torch.bfloat16)
    assert abs(loss - ref_loop) / max(abs(ref_loop), 1.0) <= BF16_TOL
    assert scaled_error(ga, grad_a) <= BF16_TOL and scaled_error(gb, grad_b) <= BF16_TOL


def test_edge_inputs_stay_finite():
    z = torch.randn(9, 16)
    same = z[:1].repeat(9, 1)  # identical embeddings everywhere
    zero = z.clone()
    zero[3] = 0  # a zero vector
    for z_a, z_b, tau in ((same, same, 0.1), (zero, z, 0.1), (z, z + 0.1, 0.01)):
        loss, ga, gb = _run(z_a, z_b, tau)
        assert torch.isfinite(torch.tensor(loss)) and torch.isfinite(ga).all() and torch.isfinite(gb).all()
        ref_loop, *_ = reference(z_a, z_b, tau)
        assert abs(loss - ref_loop) / max(abs(ref_loop), 1.0) <= FP32_TOL


def test_row_subset_against_global_columns_matches_tiled():
    """The distributed case: a rank's rows (offset into the global batch) against all gathered columns."""
    z_a, z_b = _case(40, 32, 3)
    cols = F.normalize(torch.cat([z_a, z_b]), dim=1)
    offset, n = 13, 11
    rows = torch.cat([cols[offset:offset + n], cols[40 + offset:40 + offset + n]])
    from fastclr.losses.ntxent import _ntxent_triton

    got = _ntxent_triton(rows.to(DEVICE), cols.to(DEVICE), offset, 40, 0.2).item()
    want = ntxent_tiled(rows, cols, offset, 40, 0.2).item()
    assert abs(got - want) <= 1e-5 * max(abs(want), 1.0)


# ---------------------------------------------------------------------------------------------------------------- #
# Extra negative columns (SimCLR v2's memory queue): the kernels' columns span batch + queue


def _queue(q, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(q, d, generator=g, dtype=torch.float64), dim=1).float()


def _run_queue(z_a, z_b, queue, tau, dtype=torch.float32):
    a = z_a.to(DEVICE, dtype).requires_grad_(True)
    b = z_b.to(DEVICE, dtype).requires_grad_(True)
    loss = nt_xent(a, b, tau, impl="triton", queue=queue.to(DEVICE, dtype))
    loss.backward()
    return loss.item(), a.grad.float().cpu(), b.grad.float().cpu()


# (1, 3, 5): one sample, so the queue holds every negative (the batch tile has none); Q never a multiple of 32.
@pytest.mark.parametrize("n, d, q, tau", [(1, 3, 5, 0.1), (2, 16, 1, 0.05), (7, 96, 40, 0.5), (37, 128, 70, 0.1)])
def test_queue_matches_fp64_reference(n, d, q, tau):
    z_a, z_b = _case(n, d, 100 * n + d)
    queue = _queue(q, d, q)
    ref_loop, _, grad_a, grad_b = reference(z_a, z_b, tau, queue)
    loss, ga, gb = _run_queue(z_a, z_b, queue, tau)
    assert abs(loss - ref_loop) / max(abs(ref_loop), 1.0) <= FP32_TOL
    assert scaled_error(ga, grad_a) <= FP32_TOL and scaled_error(gb, grad_b) <= FP32_TOL


def test_queue_with_bf16_inputs():
    z_a, z_b = _case(29, 64, 11)
    queue = _queue(45, 64, 12)
    ref_loop, _, grad_a, grad_b = reference(z_a, z_b, 0.2, queue)
    loss, ga, gb = _run_queue(z_a, z_b, queue, 0.2, torch.bfloat16)
    assert abs(loss - ref_loop) / max(abs(ref_loop), 1.0) <= BF16_TOL
    assert scaled_error(ga, grad_a) <= BF16_TOL and scaled_error(gb, grad_b) <= BF16_TOL


def test_empty_queue_is_exactly_no_queue():
    z_a, z_b = _case(37, 32, 5)
    plain = _run(z_a, z_b, 0.1)
    empty = _run_queue(z_a, z_b, torch.empty(0, 32), 0.1)
    assert plain[0] == empty[0] and torch.equal(plain[1], empty[1]) and torch.equal(plain[2], empty[2])


def test_column_gradient_is_formed_for_the_batch_only():
    """The column-gradient kernel covers the 2N batch columns; the queue (a constant) gets nothing."""
    from kernels import ntxent as kernel

    z_a, z_b = _case(11, 32, 9)
    cols = F.normalize(torch.cat([z_a, z_b]), dim=1).to(DEVICE)
    queue = _queue(50, 32, 10).to(DEVICE).requires_grad_(True)
    loss, lse, w = kernel.ntxent_forward(cols, cols, queue.detach(), 0, 11, 0.2)
    d_rows, d_cols = kernel.ntxent_backward(cols, cols, queue.detach(), lse, w, 0, 11, 0.2)
    assert d_rows.shape == (22, 32) and d_cols.shape == (22, 32)
    rows = cols.clone().requires_grad_(True)
    kernel.ntxent(rows, rows, 0, 11, 0.2, queue).backward()
    assert queue.grad is None and torch.isfinite(rows.grad).all()


def test_low_precision_dots_return_fp32_gradients():
    """fp32 inputs multiplied in bf16: the gradients are the fp32 accumulators, not rounded to bf16."""
    from kernels import ntxent as kernel

    z_a, z_b = _case(13, 48, 4)
    rows = F.normalize(torch.cat([z_a, z_b]), dim=1).to(DEVICE).requires_grad_(True)
    kernel.ntxent(rows, rows, 0, 13, 0.2, None, torch.bfloat16).backward()
    grad = rows.grad
    assert grad.dtype == torch.float32
    # bf16 has 8 significant bits: a gradient rounded to it would leave the low 16 bits of every fp32 word zero.
    assert (grad.view(torch.int32) & 0xFFFF).count_nonzero() > grad.numel() // 2


def test_fp32_wider_than_128_is_refused_and_auto_routes_it_to_tiled():
    """fp32 operands (tf32x3 dots) stop at d = 128: wider tiles spill on sm_80/sm_90 (tests/kernels/
    test_ntxent_aot.py). bf16 operands go to 256; ``auto`` sends what the kernels refuse to the tiled loss."""
    from fastclr.losses.ntxent import _resolve_impl
    from kernels import ntxent as kernel

    z = torch.randn(3, 129)
    with pytest.raises(ValueError, match=r"d ≤ 128 for torch.float32"):
        nt_xent(z, z + 0.1, 0.2, impl="triton")
    with pytest.raises(ValueError, match=r"≤ 128 for torch.float32 operands"):
        kernel.ntxent(F.normalize(torch.cat([z, z]), dim=1), F.normalize(torch.cat([z, z]), dim=1), 0, 3, 0.2)
    assert _resolve_impl("triton", z.bfloat16()) == "triton"
    with pytest.raises(ValueError, match=r"d ≤ 256"):
        _resolve_impl("triton", torch.randn(3, 257).bfloat16())
    assert _resolve_impl("auto", z) == "tiled"  # not CUDA here; on CUDA: fp32 d = 129 → tiled, bf16 → triton
    # fp32 embeddings multiplied in bf16 take the bf16 limit: the operands are what the tiles hold.
    loss = kernel.ntxent(F.normalize(torch.cat([z, z + 0.1]), dim=1), F.normalize(torch.cat([z, z + 0.1]), dim=1),
                         0, 3, 0.2, None, torch.bfloat16)
    assert torch.isfinite(loss)


def test_a_filling_queue_retunes_once_per_power_of_two():
    """The autotune key holds the queue length rounded up to a power of two: the momentum memory's queue grows by a
    batch every step until full, and keyed on its exact length every step would autotune again."""
    from kernels import ntxent as kernel

    z = F.normalize(torch.randn(10, 16), dim=1).to(DEVICE)
    before = len(kernel._fwd_kernel.cache)
    lengths = (3, 5, 7, 9, 13, 17, 30, 33)
    for q in lengths:
        kernel.ntxent_forward(z, z, _queue(q, 16, q).to(DEVICE), 0, 5, 0.2)
    assert len(kernel._fwd_kernel.cache) - before == len({kernel._tune_length(q) for q in lengths}) == 5
