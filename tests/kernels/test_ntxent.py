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
