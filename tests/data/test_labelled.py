"""The labelled single-view loader: labels stay with their images through DALI's read-ahead, shards partition the
epoch, the augmentation is crop + flip only, and resume reproduces the next batches exactly."""
import numpy as np
import torch

from fastclr.config import load_config
from fastclr.data.labelled import build_labelled_loader, with_labels
from fastclr.data.sources import build_source


def _loader(cfg, source, **kw):
    kw = {"batch_size": 32, "device": torch.device("cpu"), **kw}
    return build_labelled_loader(cfg.data, source, crop_area=(0.08, 1.0), **kw)


def test_labels_follow_their_images_and_shards_partition_the_epoch():
    cfg = load_config("default", ["data.prefetch=3"])
    source = build_source(cfg.data, "train")
    # Label = a function of the image itself (its summed ink), so a misaligned label shows.
    key = source.images.reshape(len(source), -1).sum(1).astype(np.int64)
    source = with_labels(source, key)
    seen = []
    for shard in range(2):
        loader = _loader(cfg, source, shard_id=shard, num_shards=2)
        loader.set_epoch(1)
        for b, (x, y) in enumerate(loader):
            assert x.shape == (32, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
            assert y.dtype == torch.int64 and y.tolist() == key[loader.epoch_order(1)[b]].tolist()
            seen += loader.epoch_order(1)[b].tolist()
    assert len(seen) == len(set(seen)) == 2 * 22 * 32


def test_views_are_crops_and_flips_without_colour_distortion():
    cfg = load_config("default", ["data.augment.crop_area=[1.0,1.0]"])
    source = build_source(cfg.data, "train")
    loader = build_labelled_loader(cfg.data, source, crop_area=(1.0, 1.0), batch_size=64, device=torch.device("cpu"),
                                   channels_last=False)
    x, _ = next(iter(loader))
    # Full-image crops, no jitter: each view is the normalized image or its mirror, pixel for pixel.
    images = torch.from_numpy(source.images[loader.epoch_order(0)[0]]).permute(0, 3, 1, 2).float() / 255
    want = (images - 0.5) / 0.5
    same, mirrored = (x - want).abs().amax((1, 2, 3)), (x - want.flip(3)).abs().amax((1, 2, 3))
    assert (torch.minimum(same, mirrored) < 2e-2).all()
    assert 10 < int((mirrored < same).sum()) < 54  # about half flipped


def test_resume_gives_the_same_next_batches():
    cfg = load_config("default")
    source = build_source(cfg.data, "train")
    first = _loader(cfg, source)
    batches = iter(first)
    for _ in range(3):
        next(batches)
    state = first.state_dict()
    want = [next(batches) for _ in range(2)]
    second = _loader(cfg, source)
    second.load_state_dict(state)
    got = iter(second)
    for (xa, ya), (xb, yb) in zip(want, [next(got) for _ in range(2)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
