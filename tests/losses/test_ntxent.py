"""NT-Xent front end, naive and tiled implementations against independent fp64 references."""
import functools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastclr.losses.ntxent as ntxent_module
import fastclr.losses.tiled as tiled
from fastclr.losses import anchor_columns, nt_xent, ntxent_naive, ntxent_tiled
from tests.helpers import ROOT
from tests.ntxent_reference import loop_anchor_losses, loop_loss, reference, scaled_error

# fp32 arithmetic against fp64 references: logits carry ~1 ulp of 1/τ each, sums over 2N terms add a few more;
# 1e-5 relative leaves an order of magnitude over what was observed (≤ 1e-6) at every shape below.
FP32_REL = 1e-5


@functools.lru_cache(maxsize=None)
def _case(n: int, d: int, tau: float):
    """Correlated views (the positive stands out, as with a trained encoder) and their fp64 references; cached so
    every implementation of a shape is graded against the same reference."""
    g = torch.Generator().manual_seed(1000 * n + d)
    z_a = torch.randn(n, d, generator=g)
    z_b = z_a + 0.7 * torch.randn(n, d, generator=g)
    return z_a, z_b, reference(z_a, z_b, tau)


def _loss_and_grads(z_a, z_b, tau, impl, **kw):
    a = z_a.detach().clone().requires_grad_(True)
    b = z_b.detach().clone().requires_grad_(True)
    loss = nt_xent(a, b, tau, impl=impl, **kw)
    loss.backward()
    return loss, a.grad, b.grad


def _rel(x: float, ref: float) -> float:
    # Relative error, absolute below 1: a loss near 0 (N = 1 is exactly 0) is the difference of a log-sum-exp and a
    # logit of size up to 1/τ, which fp32 holds to ~1e-7·(1/τ) each, so no fp32 code can be graded relative to it.
    return abs(x - ref) / max(abs(ref), 1.0)


def test_reference_gradient_matches_finite_differences():
    """The fp64 halves form's autograd gradient is the derivative of the loop definition (central differences),
    without and with a queue of extra negatives."""
    g = torch.Generator().manual_seed(3)
    for n, q in ((1, 0), (2, 0), (3, 0), (1, 2), (3, 4)):
        z_a, z_b = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g,
                                                                                   dtype=torch.float64)
        queue = F.normalize(torch.randn(q, 3, generator=g, dtype=torch.float64), dim=1) if q else None
        loop_q = None if queue is None else queue.numpy()
        loop, halves, grad_a, grad_b = reference(z_a, z_b, 0.3, queue)
        assert abs(loop - halves) < 1e-12
        h = 1e-6
        for z, grad, which in ((z_a, grad_a, 0), (z_b, grad_b, 1)):
            fd = torch.zeros_like(z)
            for idx in np.ndindex(*z.shape):
                plus, minus = z.clone(), z.clone()
                plus[idx] += h
                minus[idx] -= h
                args_p = (plus, z_b) if which == 0 else (z_a, plus)
                args_m = (minus, z_b) if which == 0 else (z_a, minus)
                fd[idx] = (loop_loss(*[t.numpy() for t in args_p], 0.3, loop_q) -
                           loop_loss(*[t.numpy() for t in args_m], 0.3, loop_q)) / (2 * h)
            torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("impl", ["naive", "tiled", "tiled-small-blocks"])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("d", [3, 64, 96, 128])
@pytest.mark.parametrize("n", [1, 2, 7, 255, 1000])
def test_matches_fp64_reference(n, d, tau, impl, monkeypatch):
    z_a, z_b, (ref_loop, ref_halves, grad_a, grad_b) = _case(n, d, tau)
    assert _rel(ref_halves, ref_loop) < 1e-12  # the two references agree
    if impl == "tiled-small-blocks":
        # Prime block sizes: no N here is a multiple, so every edge case of partial blocks is visited.
        monkeypatch.setattr(tiled, "DEFAULT_BLOCK_ROWS", 61)
        monkeypatch.setattr(tiled, "DEFAULT_BLOCK_COLS", 97)
        impl = "tiled"
    loss, ga, gb = _loss_and_grads(z_a, z_b, tau, impl)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert _rel(loss.item(), ref_loop) <= FP32_REL
    assert scaled_error(ga, grad_a) <= FP32_REL
    assert scaled_error(gb, grad_b) <= FP32_REL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_low_precision_inputs_accumulate_in_fp32(impl, dtype):
    """bf16/fp16 inputs: the loss is the fp32 loss of the same (rounded) inputs, not a bf16 computation."""
    z_a, z_b, _ = _case(255, 96, 0.1)
    z_a, z_b = z_a.to(dtype), z_b.to(dtype)
    ref_loop, _, grad_a, grad_b = reference(z_a, z_b, 0.1)  # fp64 of the rounded inputs
    loss, ga, gb = _loss_and_grads(z_a, z_b, 0.1, impl)
    assert loss.dtype == torch.float32
    assert _rel(loss.item(), ref_loop) <= FP32_REL
    # The gradient is returned in the input dtype: one rounding to 8 (bf16) or 11 (fp16) significant bits.
    assert ga.dtype == dtype and gb.dtype == dtype
    bits = 8 if dtype == torch.bfloat16 else 11
    assert scaled_error(ga, grad_a) <= 2.0 ** -bits
    assert scaled_error(gb, grad_b) <= 2.0 ** -bits


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_identical_embeddings(impl):
    """Every similarity equal: each anchor's softmax is uniform over 2N − 1 columns, so loss = log(2N − 1)."""
    n = 9
    z = torch.randn(1, 16).expand(n, 16)
    loss, ga, gb = _loss_and_grads(z, z.clone(), 0.1, impl)
    assert abs(loss.item() - math.log(2 * n - 1)) <= FP32_REL * math.log(2 * n - 1)
    # The gradient with respect to a unit vector only has a radial part here, which normalization removes.
    assert ga.abs().max().item() < 1e-5 and gb.abs().max().item() < 1e-5


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_zero_vector_gives_finite_loss_and_gradient(impl):
    z_a, z_b, _ = _case(7, 64, 0.1)
    z_a = z_a.clone()
    z_a[3] = 0
    ref_loop, _, grad_a, grad_b = reference(z_a, z_b, 0.1)
    loss, ga, gb = _loss_and_grads(z_a, z_b, 0.1, impl)
    assert torch.isfinite(loss) and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    assert _rel(loss.item(), ref_loop) <= FP32_REL
    # The zero row's gradient is scaled by 1/eps of the norm clamp; compare the other rows' at fp32 precision.
    keep = torch.arange(7) != 3
    assert scaled_error(ga[keep], grad_a[keep]) <= FP32_REL
    assert scaled_error(gb, grad_b) <= FP32_REL


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_small_temperature_is_finite_and_exact(impl, monkeypatch):
    """τ = 0.01: logits up to ±100, and most exponentials underflow (the tiled floor path)."""
    monkeypatch.setattr(tiled, "DEFAULT_BLOCK_COLS", 50)  # several column chunks: the online rescaling at work
    z_a, z_b, _ = _case(63, 32, 0.01)
    ref_loop, _, grad_a, grad_b = reference(z_a, z_b, 0.01)
    loss, ga, gb = _loss_and_grads(z_a, z_b, 0.01, impl)
    assert torch.isfinite(loss) and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    assert _rel(loss.item(), ref_loop) <= FP32_REL
    assert scaled_error(ga, grad_a) <= FP32_REL and scaled_error(gb, grad_b) <= FP32_REL


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_non_contiguous_inputs(impl):
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(33, 2 * 40, generator=g)
    z_a = wide[:, ::2]  # strided columns
    z_b = torch.randn(40, 33, generator=g).t()  # transposed view
    assert not z_a.is_contiguous() and not z_b.is_contiguous()
    loss, ga, gb = _loss_and_grads(z_a, z_b, 0.2, impl)
    ref_loss, ref_ga, ref_gb = _loss_and_grads(z_a.contiguous(), z_b.contiguous(), 0.2, impl)
    assert torch.equal(loss, ref_loss) and torch.equal(ga, ref_ga) and torch.equal(gb, ref_gb)


def test_tiled_custom_backward_gradcheck():
    """fp64 gradcheck of the hand-written backward, rows ≠ cols (a rank's anchors against the whole batch), blocks
    of 3 rows × 5 columns so that every partial block and the online rescaling are exercised."""
    g = torch.Generator().manual_seed(7)
    n_global, n, offset, d = 6, 2, 3, 4
    cols = F.normalize(torch.randn(2 * n_global, d, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    rows = F.normalize(torch.randn(2 * n, d, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    fn = lambda r, c: ntxent_tiled(r, c, offset, n_global, 0.3, block_rows=3, block_cols=5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (rows, cols))


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_rows_subset_against_all_columns(impl):
    """A block of anchors (a rank's) against every column: the mean of the loop reference over exactly those anchors,
    and blocks covering the batch average to the full loss."""
    z_a, z_b, _ = _case(255, 64, 0.1)
    n_global = 255
    per_anchor = loop_anchor_losses(z_a.numpy(), z_b.numpy(), 0.1)
    cols = F.normalize(torch.cat([z_a, z_b]), dim=1)
    fn = ntxent_naive if impl == "naive" else functools.partial(ntxent_tiled, block_rows=40, block_cols=77)
    weighted = 0.0
    for offset, n in ((0, 100), (100, 85), (185, 70)):
        rows = torch.cat([cols[offset:offset + n], cols[n_global + offset:n_global + offset + n]])
        loss = fn(rows, cols, offset, n_global, 0.1)
        own = np.r_[offset:offset + n, n_global + offset:n_global + offset + n]
        assert _rel(loss.item(), per_anchor[own].mean()) <= FP32_REL
        weighted += loss.item() * n / n_global
    assert _rel(weighted, per_anchor.mean()) <= FP32_REL


def test_anchor_columns_layout():
    own, pos = anchor_columns(4, row_offset=3, n_global=10, device="cpu")
    assert own.tolist() == [3, 4, 13, 14] and pos.tolist() == [13, 14, 3, 4]


def test_tiled_saves_only_linear_memory():
    """Backward state is Z and two statistics per row, O(N·d): no (2N × 2N) tensor is kept for backward."""
    n, d = 300, 16
    z_a = torch.randn(n, d, requires_grad=True)
    loss = nt_xent(z_a, torch.randn(n, d), 0.1, impl="tiled")
    saved = loss.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) <= 2 * (2 * n) * d + 2 * (2 * n)


def test_auto_uses_tiled_on_cpu(monkeypatch):
    calls = []
    real = ntxent_module.ntxent_tiled
    monkeypatch.setattr(ntxent_module, "ntxent_tiled", lambda *a, **k: calls.append(1) or real(*a, **k))
    nt_xent(torch.randn(5, 8), torch.randn(5, 8))
    assert calls == [1]


def test_importing_fastclr_losses_does_not_import_triton():
    code = "import sys, fastclr.losses; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": ROOT, "PATH": ""})


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(4, 8), torch.randn(5, 8)), ValueError, "same shape"),
    ((torch.randn(4, 8, 1), torch.randn(4, 8, 1)), ValueError, "z_a must be 2-D"),
    ((torch.randn(4, 8), torch.randn(8)), ValueError, "z_b must be 2-D"),
    ((torch.randn(0, 8), torch.randn(0, 8)), ValueError, "non-empty"),
    ((torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64)), TypeError, "z_a must be a floating"),
    ((torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64)), TypeError, "same dtype"),
    ((torch.randn(4, 8), torch.randn(4, 8, device="meta")), ValueError, "same device"),
    (([[1.0]], torch.randn(1, 1)), TypeError, "z_a must be a torch.Tensor"),
])
def test_bad_inputs_are_refused(args, error, match):
    with pytest.raises(error, match=match):
        nt_xent(*args)


@pytest.mark.parametrize("tau, error", [(0.0, ValueError), (-0.1, ValueError), (float("inf"), ValueError),
                                        (float("nan"), ValueError), ("0.1", TypeError), (None, TypeError)])
def test_bad_temperature_is_refused(tau, error):
    with pytest.raises(error, match="temperature"):
        nt_xent(torch.randn(3, 4), torch.randn(3, 4), temperature=tau)


def test_bad_impl_and_group_are_refused(monkeypatch):
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="impl must be one of"):
        nt_xent(z, z, impl="flash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
        nt_xent(z, z, impl="triton")
    with pytest.raises(ValueError, match="group must be None, 'world'"):
        nt_xent(z, z, group="everyone")
    # Whether an earlier test in this process set up a process group must not matter: the world is absent here.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="not initialized|initialized default process group"):
        nt_xent(z, z, group="world")
    with pytest.raises(ValueError, match="block_cols"):
        ntxent_tiled(z, z, 0, 1, 0.1, block_cols=1)


# ---------------------------------------------------------------------------------------------------------------- #
# Extra negative columns: SimCLR v2's momentum-encoder memory queue


@functools.lru_cache(maxsize=None)
def _queue_case(n: int, d: int, q: int, tau: float):
    """Views as in ``_case`` plus a queue of q unit vectors near the first views (keys of a momentum encoder are
    correlated with the batch), and the fp64 references; cached per shape."""
    z_a, z_b, _ = _case(n, d, tau)
    g = torch.Generator().manual_seed(7 * q + d)
    near = z_a[torch.randint(0, n, (q,), generator=g)] + 1.5 * torch.randn(q, d, generator=g)
    queue = F.normalize(near.double(), dim=1).float()
    return z_a, z_b, queue, reference(z_a, z_b, tau, queue)


@pytest.mark.parametrize("impl", ["naive", "tiled", "tiled-small-blocks"])
@pytest.mark.parametrize("tau", [0.05, 0.2])
@pytest.mark.parametrize("n, d, q", [(1, 3, 5), (2, 128, 1), (7, 64, 33), (255, 96, 1000)])
def test_queue_matches_fp64_reference(n, d, q, tau, impl, monkeypatch):
    z_a, z_b, queue, (ref_loop, ref_halves, grad_a, grad_b) = _queue_case(n, d, q, tau)
    assert _rel(ref_halves, ref_loop) < 1e-12
    if impl == "tiled-small-blocks":
        # Prime block sizes: the queue's chunks are partial too, and rows see batch and queue chunks in turn.
        monkeypatch.setattr(tiled, "DEFAULT_BLOCK_ROWS", 61)
        monkeypatch.setattr(tiled, "DEFAULT_BLOCK_COLS", 97)
        impl = "tiled"
    loss, ga, gb = _loss_and_grads(z_a, z_b, tau, impl, queue=queue)
    assert _rel(loss.item(), ref_loop) <= FP32_REL
    assert scaled_error(ga, grad_a) <= FP32_REL and scaled_error(gb, grad_b) <= FP32_REL
    # The queue columns move what is graded by far more than the tolerance (N = 1: from exactly 0).
    without, _, wa, _ = reference(z_a, z_b, tau)
    assert _rel(without, ref_loop) > 100 * FP32_REL or scaled_error(wa, grad_a) > 100 * FP32_REL


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_empty_queue_is_exactly_no_queue(impl, monkeypatch):
    monkeypatch.setattr(tiled, "DEFAULT_BLOCK_COLS", 50)
    z_a, z_b, _ = _case(63, 32, 0.1)
    plain = _loss_and_grads(z_a, z_b, 0.1, impl)
    empty = _loss_and_grads(z_a, z_b, 0.1, impl, queue=torch.empty(0, 32))
    assert all(torch.equal(x, y) for x, y in zip(plain, empty))


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_queue_at_small_temperature(impl, monkeypatch):
    """τ = 0.01: most exponentials underflow (the tiled floor path), in queue chunks as in batch chunks."""
    monkeypatch.setattr(tiled, "DEFAULT_BLOCK_COLS", 50)
    z_a, z_b, queue, (ref_loop, _, grad_a, grad_b) = _queue_case(63, 32, 130, 0.01)
    loss, ga, gb = _loss_and_grads(z_a, z_b, 0.01, impl, queue=queue)
    assert _rel(loss.item(), ref_loop) <= FP32_REL
    assert scaled_error(ga, grad_a) <= FP32_REL and scaled_error(gb, grad_b) <= FP32_REL


def test_tiled_custom_backward_gradcheck_with_queue():
    """fp64 gradcheck of the hand-written backward with queue columns, rows ≠ cols, blocks of 3 × 5 so that batch
    and queue chunks are both partial; the queue is a constant."""
    g = torch.Generator().manual_seed(8)
    n_global, n, offset, d = 6, 2, 3, 4
    cols = F.normalize(torch.randn(2 * n_global, d, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    rows = F.normalize(torch.randn(2 * n, d, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    queue = F.normalize(torch.randn(7, d, generator=g, dtype=torch.float64), dim=1)
    fn = lambda r, c: ntxent_tiled(r, c, offset, n_global, 0.3, block_rows=3, block_cols=5, queue=queue)  # noqa
    assert torch.autograd.gradcheck(fn, (rows, cols))


def test_tiled_with_queue_saves_only_linear_memory():
    n, d, q = 300, 16, 2000
    z_a = torch.randn(n, d, requires_grad=True)
    loss = nt_xent(z_a, torch.randn(n, d), 0.1, impl="tiled", queue=F.normalize(torch.randn(q, d), dim=1))
    saved = loss.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) <= (2 * (2 * n) + q) * d + 2 * (2 * n)


def test_bad_queues_are_refused():
    z = torch.randn(3, 4)
    for queue, error, match in ((torch.randn(5, 3), ValueError, "queue must be \\(Q, d\\)"),
                                (torch.randn(5), ValueError, "queue must be \\(Q, d\\)"),
                                (torch.ones(5, 4, dtype=torch.int64), TypeError, "floating-point"),
                                (torch.randn(5, 4, device="meta"), ValueError, "device"),
                                (torch.randn(5, 4, requires_grad=True), ValueError, "must not require grad"),
                                ([[0.0] * 4], TypeError, "queue must be None or a torch.Tensor")):
        with pytest.raises(error, match=match):
            nt_xent(z, z, queue=queue)


@pytest.mark.parametrize("offset,n,n_global,chunk", [(0, 9, 9, 5), (7, 5, 19, 4), (14, 5, 19, 64)])
def test_streamed_reference_agrees_with_the_naive_loss(offset, n, n_global, chunk):
    """The column-streamed reference that grades the GPU kernels where (M, 2N) cannot be materialized (2N·d > 2³¹,
    tests/cuda) against the naive loss in fp64, on a rank's shard of rows and chunks that do not divide 2N."""
    from tests.ntxent_reference import streamed_reference

    g = torch.Generator().manual_seed(offset + n)
    cols = F.normalize(torch.randn(2 * n_global, 11, generator=g, dtype=torch.float64), dim=1)
    rows = torch.cat([cols[offset:offset + n], cols[n_global + offset:n_global + offset + n]]).requires_grad_(True)
    c = cols.clone().requires_grad_(True)
    want = ntxent_naive(rows, c, offset, n_global, 0.3)
    want.backward()
    loss, d_rows, d_cols = streamed_reference(rows.detach(), cols, offset, n_global, 0.3, chunk=chunk)
    assert abs(loss.item() - want.item()) <= 1e-12 * abs(want.item())
    assert scaled_error(d_rows, rows.grad) <= 1e-12 and scaled_error(d_cols, c.grad) <= 1e-12
