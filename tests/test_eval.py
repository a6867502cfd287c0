import math

import torch
import torch.nn.functional as F

from fastclr.eval import knn_accuracy, linear_probe


def _knn_reference(train_x, train_y, test_x, test_y, k, t):
    """Loop-per-query reference of the temperature-weighted cosine kNN vote."""
    correct = 0
    for q, y in zip(test_x, test_y):
        sims = [(F.cosine_similarity(q, b, dim=0).item(), int(c)) for b, c in zip(train_x, train_y)]
        sims.sort(key=lambda s: -s[0])
        votes = {}
        for s, c in sims[:k]:
            votes[c] = votes.get(c, 0.0) + math.exp(s / t)
        correct += max(votes, key=votes.get) == int(y)
    return 100.0 * correct / len(test_y)


def test_knn_matches_loop_reference_on_random_features():
    g = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(97, 13, generator=g), torch.randn(41, 13, generator=g)
    train_y, test_y = torch.randint(0, 5, (97,), generator=g), torch.randint(0, 5, (41,), generator=g)
    for k in (1, 7, 20):
        got = knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=0.1, chunk=16)
        assert got == _knn_reference(train_x, train_y, test_x, test_y, k, 0.1)


def test_knn_and_probe_separate_clusters_and_fail_on_noise():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 4
    y = torch.randint(0, 4, (400,), generator=g)
    x = centers[y] + torch.randn(400, 32, generator=g)
    assert knn_accuracy(x[:300], y[:300], x[300:], y[300:], k=20) > 95
    assert linear_probe(x[:300], y[:300], x[300:], y[300:], epochs=30).test_top1 > 95
    noise = torch.randn(400, 32, generator=g)  # no signal: chance level (25%), not high
    assert knn_accuracy(noise[:300], y[:300], noise[300:], y[300:], k=20) < 50


def _evaluate(rank, world, run_dir):
    from fastclr import runtime
    from fastclr.eval import evaluate_run
    from fastclr.models import build_model
    from tests.helpers import tiny_config

    cfg = tiny_config(run_dir, "eval.probe_epochs=5", "eval.max_eval_images=301")  # 301: shards of unequal size
    torch.manual_seed(1)
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    rt = runtime.Runtime(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    return evaluate_run(cfg, model, rt, with_baseline=True, probe=True)


def test_two_ranks_evaluate_what_one_rank_does(tmp_path):
    """Every rank extracts its shard, the shards are gathered back in order, every rank reports the same figures,
    and they are the one-process figures."""
    from tests.multiproc import run_ranks

    one = run_ranks(_evaluate, 1, str(tmp_path))[0]
    two = run_ranks(_evaluate, 2, str(tmp_path))
    assert two[0] == two[1]
    assert set(one) == {"knn_top1", "probe_top1", "baseline_knn_top1", "baseline_probe_top1"}
    for key, value in one.items():
        assert abs(two[0][key] - value) < 1e-9, (key, value, two[0][key])
