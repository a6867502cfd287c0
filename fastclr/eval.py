"""Evaluation of a frozen encoder: weighted kNN monitor and a linear probe on once-extracted features.

kNN: cosine similarity to every training feature, the k nearest vote with weights exp(sim / T) (Wu et al. 2018, the
monitor used by most SimCLR/MoCo codebases). Linear probe: a linear classifier trained on frozen features that are
extracted once, without augmentation (the usual cheap stand-in for the paper's augmented linear evaluation).

Everything runs on the training device and on every rank: each rank extracts the features of its shard of both
splits, the shards are all-gathered back into split order, and every rank scores the same features the same way —
so no rank idles in a collective (with its timeout) while another computes, and K ranks report what one would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(model, loader, device: torch.device, autocast_dtype: torch.dtype | None = None):
    """(features (M, D) fp32, labels (M,) int64), on ``device``, of ``model.features`` over the loader, eval mode."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, y in loader:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                h = model.features(images)  # (B, D)
            feats.append(h.float())
            labels.append(y.to(device))
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.1,
                 chunk: int = 1024) -> float:
    """Top-1 accuracy (%) of a temperature-weighted cosine kNN classifier."""
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("knn_accuracy: empty feature set")
    k = min(k, train_x.shape[0])
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    bank = F.normalize(train_x.float(), dim=1)  # (M, D)
    train_y, test_y = train_y.to(bank.device), test_y.to(bank.device)
    correct = 0
    for start in range(0, test_x.shape[0], chunk):
        q = F.normalize(test_x[start:start + chunk].float(), dim=1)  # (C, D)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (C, k)
        w = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device).scatter_add_(1, train_y[idx], w)
        correct += (votes.argmax(1) == test_y[start:start + chunk]).sum().item()
    return 100.0 * correct / test_x.shape[0]


@dataclass
class ProbeResult:
    train_top1: float
    test_top1: float


def linear_probe(train_x, train_y, test_x, test_y, epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                 weight_decay: float = 0.0, seed: int = 0) -> ProbeResult:
    """Softmax regression on standardized frozen features: SGD with momentum and a cosine LR."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    clf = torch.nn.Linear(xtr.shape[1], num_classes).to(xtr.device)
    with torch.no_grad():
        clf.weight.copy_(torch.empty(clf.weight.shape).normal_(0, 0.01, generator=g))  # CPU generator: any device
        clf.bias.zero_()
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(xtr.shape[0] / batch_size))
    total = max(1, epochs * steps_per_epoch)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=g).to(xtr.device)
        for start in range(0, xtr.shape[0], batch_size):
            idx = perm[start:start + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(clf(xtr[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        tr = (clf(xtr).argmax(1) == train_y).float().mean().item() * 100
        te = (clf(xte).argmax(1) == test_y).float().mean().item() * 100
    return ProbeResult(train_top1=tr, test_top1=te)


def _labelled(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with a label: the loaders mark bad images (replaced by a 1-pixel stand-in image) with label -1."""
    keep = y >= 0
    return (x, y) if bool(keep.all()) else (x[keep], y[keep])


def gather_split(x: torch.Tensor, split_size: int) -> torch.Tensor:
    """Rank s holds rows s, s+K, s+2K, … of a split (``EvalLoader`` shards): every rank gets the whole split back in
    order. One all-gather of shards padded to the longest."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return x
    longest = -(-split_size // world)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    every = x.new_empty((world * longest,) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(every, padded)
    every = every.view(world, longest, *x.shape[1:])
    out = x.new_empty((split_size,) + tuple(x.shape[1:]))
    for s in range(world):
        out[s::world] = every[s, :len(range(s, split_size, world))]
    return out


def evaluate_encoder(model, train_loader, test_loader, device, *, knn_k: int, knn_temperature: float,
                     probe_epochs: int, probe_lr: float, autocast_dtype=None, seed: int = 0) -> dict:
    """kNN and linear-probe top-1 (%) of ``model.features`` on a held-out split (the loaders may be shards)."""
    splits = []
    for loader in (train_loader, test_loader):
        x, y = extract_features(model, loader, device, autocast_dtype)
        n = getattr(loader, "split_size", x.shape[0])
        splits.append(_labelled(gather_split(x, n), gather_split(y, n)))
    (xtr, ytr), (xte, yte) = splits
    out = {"knn_top1": knn_accuracy(xtr, ytr, xte, yte, k=knn_k, temperature=knn_temperature)}
    if probe_epochs > 0:
        out["probe_top1"] = linear_probe(xtr, ytr, xte, yte, epochs=probe_epochs, lr=probe_lr, seed=seed).test_top1
    return out


def evaluate_run(cfg, model, rt, *, with_baseline: bool, probe: bool = True) -> dict:
    """kNN (and the probe) of a training run's encoder on its config's held-out split; with ``with_baseline`` also
    of the random-init encoder the run started from (the same seed rebuilds it exactly). Every rank takes part and
    returns the same figures."""
    from .config import autocast_dtype
    from .data import build_eval_loader
    from .models import build_model

    e, dtype = cfg.eval, autocast_dtype(cfg)
    fmt = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    kw = dict(batch_size=256, device=rt.device, dtype=dtype or torch.float32, channels_last=cfg.precision.channels_last,
              max_images=e.max_eval_images, shard_id=rt.rank, num_shards=rt.world_size)
    train_loader, test_loader = build_eval_loader(cfg.data, "train", **kw), build_eval_loader(cfg.data, "test", **kw)
    score = dict(knn_k=e.knn_k, knn_temperature=e.knn_temperature, probe_epochs=e.probe_epochs if probe else 0,
                 probe_lr=e.probe_lr, autocast_dtype=dtype, seed=cfg.seed)
    results = evaluate_encoder(model, train_loader, test_loader, rt.device, **score)
    if with_baseline:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            baseline = build_model(cfg.model).to(rt.device, memory_format=fmt)
        base = evaluate_encoder(baseline, train_loader, test_loader, rt.device, **score)
        results.update({f"baseline_{k}": v for k, v in base.items()})
    return results
