"""What only a CUDA GPU can show (``pytest -m cuda``; skipped without one — every path here has a CPU twin tested
in the default suite): the Triton NT-Xent kernels against fp64 at one size per dtype, on a rank's shard, with the
memory queue, and past 2³¹ elements (int64 offsets); DALI's GPU pipeline with bad files, screened on the host and
reaching the GPU decoder; fp16 overflow steps skipped; steady-state steps under CUDA's sync debugger; the compiled
step against eager, loss and gradients, with TF32 off. Run by ``benchmarks/gpu_acceptance.sh`` (kernels and the
rest as separate stages: ``-k kernel`` and ``-k 'not kernel'``)."""
import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU twins: the default suite)")]

# Tolerances of the kernels against the plain formula on the operands they multiply (fp32: tf32x3 ≈ fp32; bf16/fp16
# operands: the reference rounds the same inputs, what is left is accumulation order and the bf16 cast of P − Y).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """The references multiply in fp32/fp64 with TF32 off; restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _shard(n_global, d, rank, world, dtype, seed):
    """(rows, cols): the unit embeddings of a whole batch as columns and rank ``rank`` of ``world``'s anchors."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    cols = F.normalize(torch.randn(2 * n_global, d, device="cuda", generator=g), dim=1).to(dtype)
    n, offset = n_global // world, rank * (n_global // world)
    rows = torch.cat([cols[offset:offset + n], cols[n_global + offset:n_global + offset + n]])
    return rows, cols, offset


def _check_kernel(rows, cols, offset, n_global, tau, queue=None, chunk=1 << 16):
    from fastclr.losses.ntxent import _ntxent_triton
    from tests.ntxent_reference import scaled_error, streamed_reference

    tol = TOL[rows.dtype]
    r = rows.clone().requires_grad_(True)
    c = cols.clone().requires_grad_(True)
    loss = _ntxent_triton(r, c, offset, n_global, tau, queue)
    loss.backward()
    ref_cols = cols.double() if queue is None else torch.cat([cols, queue]).double()
    # The queue as extra columns of the reference: never an anchor's own or positive column (indices ≥ 2N).
    want, d_r, d_c = streamed_reference(rows.double(), ref_cols, offset, n_global, tau, chunk=chunk)
    d_c = d_c[:cols.shape[0]]
    assert torch.isfinite(loss) and abs(loss.item() - want.item()) <= tol * abs(want.item())
    assert scaled_error(r.grad, d_r) <= 10 * tol and scaled_error(c.grad, d_c) <= 10 * tol


@pytest.mark.parametrize("dtype,d", [(torch.float32, 128), (torch.bfloat16, 256), (torch.float16, 64)])
def test_kernel_matches_fp64_one_size_per_dtype(dtype, d):
    """Odd N (never a multiple of a tile), the whole batch on one rank."""
    rows, cols, offset = _shard(3071, d, 0, 1, dtype, seed=d)
    _check_kernel(rows, cols, offset, 3071, 0.1)


def test_kernel_on_a_rank_shard():
    """Rank 2 of 4: its 2n anchors (offset 2n into the batch) against all 2N columns, as with global negatives."""
    rows, cols, offset = _shard(4 * 1023, 128, 2, 4, torch.bfloat16, seed=11)
    assert offset == 2 * 1023 and rows.shape[0] == 2 * 1023
    _check_kernel(rows, cols, offset, 4 * 1023, 0.2)


def test_kernel_with_the_memory_queue():
    g = torch.Generator(device="cuda").manual_seed(5)
    queue = F.normalize(torch.randn(4097, 128, device="cuda", generator=g), dim=1).to(torch.bfloat16)
    rows, cols, offset = _shard(1531, 128, 0, 1, torch.bfloat16, seed=6)
    _check_kernel(rows, cols, offset, 1531, 0.2, queue=queue)


def test_kernel_past_int32_offsets():
    """2N·d > 2³¹: 2N = 8,400,000 columns of d = 256 (bf16, 4.3 GB), a shard of 1,024 anchors at the far end, whose
    own and positive columns sit past element 2³¹ — only int64 offsets reach them."""
    n_global, d, n = 4_200_000, 256, 512
    assert 2 * n_global * d > 2**31
    g = torch.Generator(device="cuda").manual_seed(3)
    cols = torch.empty(2 * n_global, d, device="cuda", dtype=torch.bfloat16)
    for j in range(0, 2 * n_global, 1 << 20):  # unit rows, generated a slab at a time
        cols[j:j + (1 << 20)] = F.normalize(torch.randn(min(1 << 20, 2 * n_global - j), d, device="cuda",
                                                        generator=g), dim=1).to(torch.bfloat16)
    offset = n_global - n
    rows = torch.cat([cols[offset:offset + n], cols[n_global + offset:n_global + offset + n]])
    assert (n_global + offset) * d > 2**31
    torch.backends.cuda.matmul.allow_tf32 = False
    from fastclr.losses.ntxent import _ntxent_triton
    from tests.ntxent_reference import scaled_error, streamed_reference

    r, c = rows.clone().requires_grad_(True), cols.requires_grad_(True)
    loss = _ntxent_triton(r, c, offset, n_global, 0.1)
    loss.backward()
    # fp32 reference (fp64 would need 17 GB per copy of the columns) on the bf16 operands, TF32 off.
    want, d_r, d_c = streamed_reference(rows.float(), cols.detach().float(), offset, n_global, 0.1, chunk=1 << 18)
    assert abs(loss.item() - want.item()) <= TOL[torch.bfloat16] * abs(want.item())
    assert scaled_error(r.grad, d_r) <= 10 * TOL[torch.bfloat16]
    tail = slice(n_global + offset - 4096, 2 * n_global)  # the far end, positives included
    assert scaled_error(c.grad[tail], d_c[tail]) <= 10 * TOL[torch.bfloat16]


def _mixed_tar(tmp_path, shared_data):
    import io
    import os
    import tarfile

    src = os.path.join(shared_data, "cifar10-train-10k.tar")
    with tarfile.open(src) as tf:
        members = [m for m in tf.getmembers() if m.isfile()][:250]
        blobs = [(m.name, tf.extractfile(m).read()) for m in members]
    bad = {"train/cat/bad_truncated.jpg": blobs[0][1][:len(blobs[0][1]) // 2], "train/cat/bad_empty.jpg": b"",
           "train/dog/bad_text.jpg": b"<html>not an image</html>" * 4}
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in blobs + list(bad.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path, bad


@pytest.mark.parametrize("screened", [True, False], ids=["host-screen", "gpu-decoder"])
def test_dali_gpu_pipeline_skips_bad_files_of_the_real_tar(tmp_path, shared_data, screened):
    """With the host screen the bad files never reach the GPU; with it switched off the GPU decoder meets them, the
    pipeline fails, and the loader's recovery names the culprits and rebuilds: every batch still full."""
    from fastclr.config import DataConfig
    from fastclr.data import build_train_loader

    path, bad = _mixed_tar(tmp_path, shared_data)
    cfg = DataConfig(dataset="tar", path=str(path), eval_path=str(path), image_size=32)
    loader = build_train_loader(cfg, batch_size=50, device=torch.device("cuda"), dtype=torch.bfloat16)
    if not screened:
        loader.bad.screen_fn = lambda buf: None
    seen = 0
    for a, b in loader:
        assert a.is_cuda and a.dtype == torch.bfloat16 and a.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(a.float()).all() and torch.isfinite(b.float()).all()
        seen += a.shape[0]
    assert seen == len(loader) * 50
    assert {n.split(":", 1)[1] for n, _ in loader.bad.names()} == set(bad)


def _trainer(tmp_path, *extra):
    from tests.helpers import tiny_config

    from fastclr import logs, runtime
    from fastclr.config import validate_run
    from fastclr.trainer import Trainer

    cfg = tiny_config(tmp_path, "train.epochs=10", "train.global_batch_size=256", *extra)
    rt = runtime.setup("auto")
    logs.setup(rt.rank)
    return Trainer(cfg, rt, validate_run(cfg, 1, True))


def test_fp16_overflow_steps_are_skipped(tmp_path):
    """An fp16 step whose gradients overflow leaves every weight as it was, halves the loss scale and is counted;
    the steps around it train."""
    trainer = _trainer(tmp_path, "precision.dtype=fp16", "model.compile=false")
    scaler = trainer.engine.torch_autocast_z0_gradscaler
    for _ in range(3):
        trainer.train_step(trainer.next_micro_batches())
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    scale = scaler.get_scale()
    a, b = trainer.next_micro_batches()[0]
    huge = torch.full_like(a, 6e4)  # fp16's largest normal is 65504: the first conv's outputs overflow to inf
    trainer.train_step([(huge, huge)])
    assert trainer.skips.check(trainer.step)[0] == 1
    assert scaler.get_scale() < scale
    assert all(torch.equal(w, p) for w, p in zip(weights, trainer.model.parameters()))
    loss = trainer.train_step([(a, b)])
    assert torch.isfinite(loss) and trainer.skips.check(trainer.step) == (1, 0)
    assert any(not torch.equal(w, p) for w, p in zip(weights, trainer.model.parameters()))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_thirty_steady_steps_never_wait_for_the_device(tmp_path, dtype):
    """torch.cuda.set_sync_debug_mode('error'): any synchronizing CUDA call in the step raises."""
    trainer = _trainer(tmp_path, f"precision.dtype={dtype}", "train.log_every=1000")
    trainer.stop.start_clock()
    for _ in range(3):
        trainer.window.add(trainer.train_step(trainer.next_micro_batches()))
        trainer.after_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(30):
            trainer.window.add(trainer.train_step(trainer.next_micro_batches()))
            assert trainer.after_step() is None
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(trainer.window.loss_sum)


def test_compiled_step_matches_eager_loss_and_gradients(tmp_path):
    """fp32 with TF32 off, the same initial weights and batch: the step compiled per region (inductor) and the eager
    one, each against an fp64 copy of the network — the loss within 1e-5 of fp64 for both, every parameter's
    gradient (read from the buckets the optimizer steps on) no farther from fp64 than twice eager's distance. (At
    this width the fp32 gradient is ill-conditioned: eager itself is ~1% off fp64 on the CPU, tests/test_compile.)"""
    from fastclr.losses import nt_xent
    from fastclr.models import build_model

    eager = _trainer(tmp_path / "eager", "model.compile=false", "precision.dtype=fp32")
    compiled = _trainer(tmp_path / "compiled", "model.compile=true", "precision.dtype=fp32")
    batches = eager.next_micro_batches()
    for p, q in zip(eager.model.parameters(), compiled.model.parameters()):
        assert torch.equal(p, q)
    reference = build_model(eager.cfg.model).cuda().double()
    reference.load_state_dict(eager.model.state_dict())
    (a, b), = batches
    z = reference(torch.cat([a, b]).double())
    want = nt_xent(*z.chunk(2), temperature=eager.cfg.loss.temperature, impl="naive")
    want.backward()
    ref_grads = [p.grad for p in reference.parameters()]
    losses, errors = {}, {}
    for name, trainer in (("eager", eager), ("compiled", compiled)):
        losses[name] = trainer.train_step(batches).item()
        grads = [trainer.grads._where[p][1] for p in trainer.model.parameters()]
        assert len(grads) == len(ref_grads)
        errors[name] = max(((g.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
                           for g, r in zip(grads, ref_grads))
    for name, loss in losses.items():
        assert abs(loss - want.item()) <= 1e-5 * abs(want.item()), (name, losses, want.item())
    assert errors["compiled"] <= 2 * errors["eager"] + 1e-6, errors


@pytest.mark.parametrize("shape", [(16, 24, 8, 8), (32, 48)], ids=["channels_last-4d", "2d-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_global_bn_backward_on_cuda_against_batch_norm(shape, dtype):
    """The eager CUDA path of the global BN's backward (ATen's channels-last / 2-D kernel reads the saved
    statistics and asserts they exist) in one process, against torch's BatchNorm on the same input. The 2-rank
    NCCL run needs two GPUs, which the one-GPU acceptance run does not have."""
    from fastclr.distributed import GlobalBatchNorm

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(*shape, device="cuda", generator=g).mul(3).add(1).to(dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(*shape, device="cuda", generator=g).to(dtype)
    ours = GlobalBatchNorm(shape[1]).cuda()
    ref = (torch.nn.BatchNorm2d if x.dim() == 4 else torch.nn.BatchNorm1d)(shape[1]).cuda()
    xs, xr = x.clone().requires_grad_(True), x.double().clone().requires_grad_(True)
    ours(xs).backward(dy)
    ref.double()(xr).backward(dy.double())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xs.grad.double(), xr.grad, **tol)
    torch.testing.assert_close(ours.weight.grad.double(), ref.weight.grad, **tol)
    torch.testing.assert_close(ours.bias.grad.double(), ref.bias.grad, **tol)
