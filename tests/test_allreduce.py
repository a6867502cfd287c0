"""The overlapped gradient all-reduce (fastclr/allreduce.py) on real gloo ranks: the same averaged gradients as an
all-reduce after backward, started during backward."""
import torch

from tests.multiproc import run_ranks


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 5 * 5, 7), torch.nn.Linear(7, 3)).to(
        memory_format=torch.channels_last)


def _grads(rank, world, overlap, accumulation):
    from fastclr.allreduce import GradientBuckets

    model = _model()
    buckets = GradientBuckets(model.parameters(), world, bucket_mb=0.002, overlap=overlap)  # ~2 KB: several buckets
    g = torch.Generator().manual_seed(100 + rank)
    micro = [torch.randn(4, 3, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
             for _ in range(accumulation)]
    buckets.prepare()
    started_in_backward = 0
    for i, x in enumerate(micro):
        if i == accumulation - 1:
            buckets.arm()
        (model(x).square().mean() / accumulation).backward()
    started_in_backward = sum(b.work is not None for b in buckets.buckets)
    buckets.finish()
    views_kept = all(p.grad.data_ptr() == v.data_ptr() for b in buckets.buckets for p, v in zip(b.params, b.views))
    return {"grads": [p.grad.clone() for p in model.parameters()], "buckets": len(buckets.buckets),
            "started_in_backward": started_in_backward, "views_kept": views_kept,
            "local": _local(micro, accumulation)}


def _local(micro, accumulation):
    model = _model()
    for x in micro:
        (model(x).square().mean() / accumulation).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_overlapped_and_deferred_all_reduce_give_the_mean_gradient():
    for accumulation in (1, 2):
        on = run_ranks(_grads, 2, True, accumulation)
        off = run_ranks(_grads, 2, False, accumulation)
        assert on[0]["buckets"] >= 3 and on[0]["views_kept"]
        assert on[0]["started_in_backward"] == on[0]["buckets"]  # every bucket left during backward
        assert off[0]["started_in_backward"] == 0
        mean = [(a + b) / 2 for a, b in zip(on[0]["local"], on[1]["local"])]
        for r in range(2):
            for x, y, m in zip(on[r]["grads"], off[r]["grads"], mean):
                assert torch.equal(x, y)  # the same collective on the same bytes, only started earlier
                torch.testing.assert_close(x, m, rtol=1e-6, atol=1e-8)
                assert x.is_contiguous(memory_format=torch.channels_last) or x.dim() != 4


def test_one_rank_keeps_gradients_in_place():
    from fastclr.allreduce import GradientBuckets

    model = _model()
    buckets = GradientBuckets(model.parameters(), 1)
    buckets.prepare()
    buckets.arm()
    model(torch.randn(2, 3, 9, 9)).sum().backward()
    buckets.finish()
    want = [p.grad.clone() for p in model.parameters()]
    flat = torch.cat([b.flat for b in buckets.buckets])
    assert sorted(flat.tolist()) == sorted(torch.cat([g.flatten() for g in want]).tolist())


def test_first_bucket_is_small_so_a_one_bucket_model_still_overlaps():
    from fastclr.allreduce import GradientBuckets

    model = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 300), torch.nn.Linear(300, 10))
    mb = lambda b: b.flat.numel() * 4 / 2**20  # noqa: E731
    whole = GradientBuckets(model.parameters(), 2, bucket_mb=25.0, first_bucket_mb=25.0)
    assert len(whole.buckets) == 1  # 0.7 MB: one bucket, whose all-reduce can only start when backward ends
    split = GradientBuckets(model.parameters(), 2, bucket_mb=25.0, first_bucket_mb=0.4)
    assert len(split.buckets) == 2 and mb(split.buckets[0]) <= 0.4
    assert split.buckets[0].params[0] is model[2].bias  # backward's first gradients: the last layer's
