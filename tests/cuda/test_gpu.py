"""What only a CUDA GPU can show (``pytest -m cuda``; skipped without one — every path here has a CPU twin tested
in the default suite): the Triton NT-Xent kernels at size, DALI's GPU pipeline with bad files, fp16 loss scaling,
steady-state steps under CUDA's sync debugger, the compiled step. Run by ``benchmarks/gpu_acceptance.sh``."""
import math

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU twins: the default suite)")]


def _reference(rows, cols, row_offset, n_global, tau, block=4096):
    """fp64, blockwise, the plain formula: loss_i = log Σ_{j ≠ self} exp(s_ij) − s_i,pos with s = rows·colsᵀ/τ, and
    its gradient (P − Y)/M through rows and cols; exact softmax per block of anchors (no online update)."""
    r, c = rows.double(), cols.double()
    m = r.shape[0]
    mine = torch.arange(row_offset, row_offset + m // 2)  # this block's samples
    own = torch.cat([mine, n_global + mine])
    pos = torch.cat([n_global + mine, mine])
    own, pos = own.to(r.device), pos.to(r.device)
    loss, d_r, d_c = 0.0, torch.zeros_like(r), torch.zeros_like(c)
    for i0 in range(0, m, block):
        i1 = min(i0 + block, m)
        s = r[i0:i1] @ c.t() / tau  # (b, 2N)
        idx = torch.arange(i1 - i0, device=r.device)
        s[idx, own[i0:i1]] = -math.inf
        lse = torch.logsumexp(s, 1)
        loss += (lse - s[idx, pos[i0:i1]]).sum().item()
        g = torch.exp(s - lse[:, None])
        g[idx, pos[i0:i1]] -= 1.0
        d_r[i0:i1] = g @ c / (m * tau)
        d_c += g.t() @ r[i0:i1] / (m * tau)
    return loss / m, d_r, d_c


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("two_n,rank_of", [(2 * 1531, (0, 1)), (2 * 9973, (1, 3)), (65536, (2, 4))])
def test_triton_ntxent_matches_fp64_at_size(dtype, tol, d, two_n, rank_of):
    """Odd N, 2N up to 65,536; rows = one rank's anchors (row offset of rank r of K) against every column."""
    from fastclr.losses.ntxent import _ntxent_triton
    from tests.ntxent_reference import scaled_error

    g = torch.Generator(device="cuda").manual_seed(two_n + d)
    n_global = two_n // 2
    rank, world = rank_of
    n = n_global // world if n_global % world == 0 else n_global  # a shard when it divides, else all rows
    offset = rank * n if n < n_global else 0
    cols = torch.nn.functional.normalize(torch.randn(two_n, d, device="cuda", generator=g), dim=1)
    rows = torch.cat([cols[offset:offset + n], cols[n_global + offset:n_global + offset + n]])
    r = rows.to(dtype).clone().requires_grad_(True)
    c = cols.to(dtype).clone().requires_grad_(True)
    loss = _ntxent_triton(r, c, offset, n_global, 0.1)
    loss.backward()
    want, d_r, d_c = _reference(r.detach(), c.detach(), offset, n_global, 0.1)
    assert torch.isfinite(loss) and abs(loss.item() - want) <= tol * abs(want)
    assert scaled_error(r.grad, d_r) <= tol * 10 and scaled_error(c.grad, d_c) <= tol * 10


def test_dali_gpu_pipeline_skips_bad_files_of_the_real_tar(tmp_path, shared_data):
    import io
    import os
    import tarfile

    from fastclr.config import DataConfig
    from fastclr.data import build_train_loader

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
    cfg = DataConfig(dataset="tar", path=str(path), eval_path=str(path), image_size=32)
    loader = build_train_loader(cfg, batch_size=50, device=torch.device("cuda"), dtype=torch.bfloat16)
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


def test_fp16_loss_scaling_steps(tmp_path):
    trainer = _trainer(tmp_path, "precision.dtype=fp16")
    losses = [trainer.train_step(trainer.next_micro_batches()) for _ in range(10)]
    assert all(torch.isfinite(x) for x in losses)
    assert trainer.engine.torch_autocast_z0_gradscaler.get_scale() > 0


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


def test_compiled_step_runs_and_matches_eager(tmp_path):
    eager = _trainer(tmp_path / "eager", "model.compile=false", "precision.dtype=fp32")
    compiled = _trainer(tmp_path / "compiled", "model.compile=true", "precision.dtype=fp32")
    batches = eager.next_micro_batches()
    a = eager.train_step(batches).item()
    b = compiled.train_step(batches).item()
    assert abs(a - b) <= 1e-4 * abs(a), (a, b)
