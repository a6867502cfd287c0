import dataclasses
import os
import warnings

import numpy as np
import pytest
import torch

from fastclr.config import AugmentConfig, DataConfig
from fastclr.data import TrainLoader, build_eval_loader, build_train_loader
from fastclr.data.sources import ArraySource, digits_source

CPU = torch.device("cpu")
# Every random operator off and normalization to x/255: a view is its source image, readable back exactly.
IDENTITY = AugmentConfig(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                         blur_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
MEAN = torch.tensor(AugmentConfig().mean).view(1, 3, 1, 1)
STD = torch.tensor(AugmentConfig().std).view(1, 3, 1, 1)


def indexed_source(n: int, size: int = 8) -> ArraySource:
    """Image i is the constant colour (i mod 256, i div 256, 7): the index can be read back from any view."""
    imgs = np.zeros((n, size, size, 3), np.uint8)
    imgs[..., 0] = (np.arange(n) % 256)[:, None, None]
    imgs[..., 1] = (np.arange(n) // 256)[:, None, None]
    imgs[..., 2] = 7
    return ArraySource(imgs, np.arange(n) % 10)


def read_indices(view: torch.Tensor) -> np.ndarray:
    px = torch.round(view[:, :, 0, 0].float() * 255).to(torch.int64)  # (B, 3)
    assert torch.all(px[:, 2] == 7)
    return (px[:, 0] + 256 * px[:, 1]).numpy()


def order_loader(n=103, batch=8, shard=0, shards=1, seed=0) -> TrainLoader:
    cfg = DataConfig(image_size=8, augment=IDENTITY, seed=seed)
    return TrainLoader(indexed_source(n), cfg, batch_size=batch, shard_id=shard, num_shards=shards, device=CPU)


def take(loader, n_batches: int) -> list[np.ndarray]:
    """The next ``n_batches`` batches' indices, crossing epoch ends like a training loop does."""
    out = []
    while len(out) < n_batches:
        for a, b in loader:
            np.testing.assert_array_equal(read_indices(a), read_indices(b))
            out.append(read_indices(a))
            if len(out) == n_batches:
                break
    return out


# --------------------------------------------------------------------------------------------------------------- #
# batches: layout, dtype, normalization, randomness


def test_train_batches_are_normalized_nhwc_views_in_epoch_order():
    aug = AugmentConfig(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                        blur_p=0.0)  # default ImageNet mean/std
    loader = build_train_loader(DataConfig(augment=aug), batch_size=64, device=CPU)
    assert len(loader) == 1437 // 64 and loader.num_samples == (1437 // 64) * 64
    src = digits_source("train", 32).images
    for k, (a, b) in enumerate(loader):
        assert a.shape == b.shape == (64, 3, 32, 32) and a.dtype == torch.float32 and a.device == CPU
        assert a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
        x = torch.from_numpy(src[loader.epoch_order(0)[k]]).permute(0, 3, 1, 2).float() / 255
        torch.testing.assert_close(a, (x - MEAN) / STD, atol=1e-5, rtol=0)
        if k == 2:
            break


def test_layout_and_dtype_options_give_the_same_values():
    cfg = DataConfig(seed=3)
    nhwc = next(iter(build_train_loader(cfg, batch_size=32, device=CPU)))
    nchw = next(iter(build_train_loader(cfg, batch_size=32, device=CPU, channels_last=False)))
    bf16 = next(iter(build_train_loader(cfg, batch_size=32, device=CPU, dtype=torch.bfloat16)))
    assert nchw[0].is_contiguous() and nchw[0].shape == (32, 3, 32, 32)
    assert bf16[0].dtype == torch.bfloat16 and bf16[0].is_contiguous(memory_format=torch.channels_last)
    for v in range(2):
        torch.testing.assert_close(nchw[v], nhwc[v], atol=0, rtol=0)
        torch.testing.assert_close(bf16[v].float(), nhwc[v], atol=0.02, rtol=0.01)


def test_views_differ_and_seed_decides_the_batches():
    def first_batches(seed, n=2):
        loader = build_train_loader(DataConfig(seed=seed), batch_size=48, device=CPU)
        return [tuple(v.clone() for v in views) for _, views in zip(range(n), loader)]

    a, again, other = first_batches(0), first_batches(0), first_batches(1)
    for (a0, a1), (b0, b1) in zip(a, again):
        assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert all(not torch.equal(x[0], y[0]) for x, y in zip(a, other))
    va, vb = a[0]
    assert torch.all((va - vb).abs().flatten(1).mean(1) > 0.05)  # the two views of every image differ
    assert va.std() > 0.5 and abs(va.mean()) < 1.5  # normalized scale, not raw 0–255


# --------------------------------------------------------------------------------------------------------------- #
# order, sharding, resume


def test_epoch_is_a_seeded_permutation_with_drop_last():
    loader = order_loader(n=103, batch=8)
    assert len(loader) == 12 and loader.num_samples == 96
    epoch0 = np.concatenate(take(loader, 12))
    np.testing.assert_array_equal(epoch0, loader.epoch_order(0).ravel())
    assert len(set(epoch0.tolist())) == 96
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["position"] == 12
    epoch1 = np.concatenate(take(loader, 12))
    assert len(set(epoch1.tolist())) == 96 and not np.array_equal(epoch0, epoch1)
    assert loader.state_dict()["epoch"] == 1
    np.testing.assert_array_equal(order_loader(seed=0).epoch_order(1), loader.epoch_order(1))
    assert not np.array_equal(order_loader(seed=1).epoch_order(1), loader.epoch_order(1))


@pytest.mark.parametrize("shards", [2, 3])
def test_shards_cover_each_sample_once_per_epoch(shards):
    n, batch = 103, 5
    for epoch in (0, 1):
        seen = []
        for s in range(shards):
            loader = order_loader(n, batch, shard=s, shards=shards)
            loader.set_epoch(epoch)
            got = np.concatenate(take(loader, len(loader)))
            np.testing.assert_array_equal(got, loader.epoch_order(epoch).ravel())
            assert len(got) == len(loader) * batch
            seen.append(got)
        allseen = np.concatenate(seen)
        assert len(allseen) == len(set(allseen.tolist())) == (n // shards // batch) * batch * shards
        assert len(allseen) > n - shards * batch  # only the tail that cannot fill a batch on every shard is dropped


def test_set_epoch_is_a_pure_function_of_seed_epoch_and_shards():
    straight = order_loader()
    take(straight, 3 * 12)  # epochs 0, 1, 2
    epoch3 = take(straight, 12)
    jumped = order_loader()
    jumped.set_epoch(3)
    np.testing.assert_array_equal(np.concatenate(take(jumped, 12)), np.concatenate(epoch3))


@pytest.mark.parametrize("stop", [5, 12, 17])
def test_resume_continues_the_uninterrupted_order(stop):
    reference = take(order_loader(), 30)
    first = order_loader()
    head = take(first, stop)
    state = first.state_dict()
    resumed = order_loader()
    resumed.load_state_dict(state)
    tail = take(resumed, 30 - stop)
    np.testing.assert_array_equal(np.concatenate(head + tail), np.concatenate(reference))


def test_resume_reproduces_augmented_pixels_exactly():
    cfg = DataConfig(seed=5)  # the full SimCLR recipe, blur included
    def run(loader, n):
        out = []
        while len(out) < n:
            for a, b in loader:
                out.append((a.clone(), b.clone()))
                if len(out) == n:
                    break
        return out

    reference = run(build_train_loader(cfg, batch_size=64, device=CPU), 30)  # 22 batches per epoch: crosses one end
    first = build_train_loader(cfg, batch_size=64, device=CPU)
    head = run(first, 9)
    state = first.state_dict()
    resumed = build_train_loader(cfg, batch_size=64, device=CPU)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["pipeline"] == state["pipeline"]  # saved again before running: nothing lost
    tail = run(resumed, 21)
    for (a, b), (c, d) in zip(reference, head + tail):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_trainer_style_epoch_loop_and_resume_at_epoch_end_keep_one_stream():
    """The trainer's loop: start at the saved position, break at the last batch, set_epoch(e + 1). A state saved at
    the end of epoch 0 (position == len) resumes into epoch 1, with the pixels the uninterrupted loop sees."""
    cfg = DataConfig(seed=2, augment=AugmentConfig(blur_p=0.0))

    def trainer_epochs(loader, epochs):
        out = []
        for e in epochs:
            position = loader.state_dict()["position"]
            for a, _ in loader:
                out.append(a.clone())
                position += 1
                if position >= len(loader):
                    break
            loader.set_epoch(e + 1)
        return out

    plain = build_train_loader(cfg, batch_size=128, device=CPU)
    straight = [a.clone() for e in range(2) for a, _ in plain]
    first = build_train_loader(cfg, batch_size=128, device=CPU)
    looped = trainer_epochs(first, [0])
    state = first.state_dict()
    state["epoch"], state["position"] = 0, len(first)  # as a trainer saves after the last step, before set_epoch
    resumed = build_train_loader(cfg, batch_size=128, device=CPU)
    resumed.load_state_dict(state)
    looped += trainer_epochs(resumed, [0, 1])  # epoch 0 is used up: its loop yields nothing
    assert len(looped) == len(straight) == 2 * len(plain)
    assert all(torch.equal(x, y) for x, y in zip(straight, looped))


def test_load_state_dict_checks_what_the_position_depends_on():
    loader = order_loader()
    take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="batch_size 8"):
        order_loader(batch=16).load_state_dict(state)
    with pytest.raises(ValueError, match="num_shards 1"):
        order_loader(shards=2).load_state_dict(state)
    # Other augmentation settings: the DALI state does not fit; the order still resumes exactly, with a warning.
    changed = DataConfig(image_size=8, augment=dataclasses.replace(IDENTITY, flip_p=0.5))  # constant images: no-op
    other = TrainLoader(indexed_source(103), changed, batch_size=8, device=CPU)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other.load_state_dict(state)
    assert any("augmentation" in str(w.message) for w in caught)
    np.testing.assert_array_equal(take(other, 1)[0], loader.epoch_order(0)[3])


def test_bad_arguments_fail_early(tmp_path):
    with pytest.raises(ValueError, match="more than the 103 samples"):
        order_loader(n=103, batch=60, shards=2)
    with pytest.raises(ValueError, match="shard_id"):
        order_loader(shard=2, shards=2)
    with pytest.raises(FileNotFoundError, match="no-folder"):
        build_train_loader(DataConfig(dataset="folder", path=str(tmp_path / "no-folder")), batch_size=4, device=CPU)
    with pytest.raises(FileNotFoundError, match="no-list.txt"):
        build_train_loader(DataConfig(dataset="filelist", path=str(tmp_path / "no-list.txt")), batch_size=4,
                           device=CPU)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty"):
        build_train_loader(DataConfig(dataset="folder", path=str(tmp_path / "empty")), batch_size=4, device=CPU)


# --------------------------------------------------------------------------------------------------------------- #
# evaluation


def test_eval_digits_whole_split_once_deterministic():
    cfg = DataConfig()
    loader = build_eval_loader(cfg, "test", batch_size=100, device=CPU)
    src = digits_source("test", 32)
    assert len(loader) == 4 and loader.num_samples == 360
    passes = []
    for _ in range(2):
        images, labels = zip(*[(x.clone(), y) for x, y in loader])
        assert [len(y) for y in labels] == [100, 100, 100, 60]
        assert all(y.dtype == torch.int64 for y in labels)
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x in images)
        passes.append(torch.cat(images))
        np.testing.assert_array_equal(torch.cat(labels).numpy(), src.labels)
    assert torch.equal(passes[0], passes[1])
    x = torch.from_numpy(src.images).permute(0, 3, 1, 2).float() / 255  # 32-px digits at image_size 32: no resize
    torch.testing.assert_close(passes[0], (x - MEAN) / STD, atol=1e-5, rtol=0)
    train = build_eval_loader(cfg, "train", batch_size=512, device=CPU, dtype=torch.bfloat16, channels_last=False)
    xs, ys = zip(*train)
    assert sum(len(y) for y in ys) == 1437 and xs[0].dtype == torch.bfloat16 and xs[0].is_contiguous()


def test_eval_max_images_is_a_fixed_subset():
    cfg = DataConfig()
    a = build_eval_loader(cfg, "train", batch_size=64, device=CPU, max_images=100)
    b = build_eval_loader(cfg, "train", batch_size=64, device=CPU, max_images=100)
    assert a.num_samples == 100 and len(a) == 2 and np.array_equal(a.indices, b.indices)
    assert len(set(a.indices.tolist())) == 100 and len(set(a.labels.tolist())) == 10  # spread over the classes
    ya = torch.cat([y for _, y in a])
    np.testing.assert_array_equal(ya.numpy(), digits_source("train", 32).labels[a.indices])


def test_eval_abandoned_pass_then_full_pass():
    loader = build_eval_loader(DataConfig(), "test", batch_size=50, device=CPU)
    next(iter(loader))
    assert sum(len(y) for _, y in loader) == 360


def _pil_rgb(path):
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()  # (3, H, W) 0–255


def test_eval_folder_resize_and_centre_crop(cifar_train_dir, cifar_test_dir):
    import torch.nn.functional as F

    # 32-px images at image_size 32: shorter side already <= image_size → resized to 32 (unchanged), no crop.
    cfg = DataConfig(dataset="folder", path=cifar_train_dir, eval_path=cifar_test_dir, image_size=32)
    loader = build_eval_loader(cfg, "test", batch_size=64, device=CPU, channels_last=False)
    images, labels = zip(*loader)
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.shape == (100, 3, 32, 32) and labels.tolist() == loader.source.labels.tolist()
    ref = torch.stack([_pil_rgb(p) for p in loader.source.paths]) / 255
    got = images * STD + MEAN
    assert (got - ref).abs().mean() < 1.5 / 255 and (got - ref).abs().max() < 40 / 255  # decoder IDCT differences

    # image_size 24: shorter side 32 → 27 (24·8/7), centre crop 24.
    cfg24 = DataConfig(dataset="folder", path=cifar_train_dir, eval_path=cifar_test_dir, image_size=24)
    got24 = torch.cat([x for x, _ in build_eval_loader(cfg24, "test", batch_size=64, device=CPU)]) * STD + MEAN
    resized = F.interpolate(ref, size=(27, 27), mode="bilinear", antialias=True, align_corners=False)
    off = round((27 - 24) / 2)  # 2, as torchvision's CenterCrop rounds it
    ref24 = resized[:, :, off:off + 24, off:off + 24]
    assert (got24 - ref24).abs().mean() < 1 / 255
    wrong = resized[:, :, 1:25, 1:25]  # off by one pixel: measurably worse
    assert (got24 - wrong).abs().mean() > 2 * (got24 - ref24).abs().mean()


def test_eval_image_size_sets_the_evaluation_side_only(cifar_train_dir, cifar_test_dir):
    # Training crops of 24 px, evaluation on the whole 32-px images: the eval loader gives exactly what
    # image_size=32 gives, the train loader still 24-px views; the digits are rendered at the evaluation side.
    kw = dict(dataset="folder", path=cifar_train_dir, eval_path=cifar_test_dir)
    small = DataConfig(image_size=24, eval_image_size=32, **kw)
    assert small.eval_size == 32 and DataConfig(image_size=24, **kw).eval_size == 24
    got = torch.cat([x for x, _ in build_eval_loader(small, "test", batch_size=64, device=CPU)])
    ref = torch.cat([x for x, _ in build_eval_loader(DataConfig(image_size=32, **kw), "test", batch_size=64,
                                                     device=CPU)])
    assert got.shape == (100, 3, 32, 32) and torch.equal(got, ref)
    a, _ = next(iter(build_train_loader(small, batch_size=16, device=CPU)))
    assert a.shape == (16, 3, 24, 24)
    digits = torch.cat([x for x, _ in build_eval_loader(DataConfig(image_size=16, eval_image_size=40), "test",
                                                        batch_size=100, device=CPU, channels_last=False)])
    x = torch.from_numpy(digits_source("test", 40).images).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(digits, (x - MEAN) / STD, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="data.eval_image_size"):
        DataConfig(eval_image_size=4)


def test_folder_train_loader_decodes_real_jpegs(cifar_train_dir):
    cfg = DataConfig(dataset="folder", path=cifar_train_dir, augment=AugmentConfig(jitter_strength=0.5, blur_p=0.0))
    loader = build_train_loader(cfg, batch_size=64, shard_id=1, num_shards=2, device=CPU)
    assert len(loader) == 2 and loader.num_samples == 256
    batches = [(a.clone(), b.clone()) for a, b in loader]
    assert len(batches) == 2 and batches[0][0].shape == (64, 3, 32, 32)
    assert not torch.equal(batches[0][0], batches[0][1])
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["position"] == 0


def test_tar_shards_train_and_eval(shared_data):
    cfg = DataConfig(dataset="tar", path=os.path.join(shared_data, "cifar10-train-10k.tar"),
                     eval_path=os.path.join(shared_data, "cifar10-test-2k.tar"), augment=AugmentConfig(blur_p=0.0))
    loader = build_train_loader(cfg, batch_size=256, shard_id=2, num_shards=4, device=CPU)
    assert len(loader) == 9 and loader.num_samples == 9 * 256 * 4
    a, b = next(iter(loader))
    assert a.shape == (256, 3, 32, 32) and not torch.equal(a, b)
    test = build_eval_loader(cfg, "test", batch_size=128, device=CPU, max_images=300)
    ys = torch.cat([y for _, y in test])
    assert len(ys) == 300 and torch.equal(ys, test.labels) and set(ys.tolist()) == set(range(10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the DALI graph then runs GPU-side")
def test_gpu_pipeline_matches_cpu_layout_and_eval_values():
    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = DataConfig()
    a, b = next(iter(build_train_loader(cfg, batch_size=64, device=dev, dtype=torch.float16)))
    assert a.device == dev and a.dtype == torch.float16 and a.shape == (64, 3, 32, 32)
    assert a.is_contiguous(memory_format=torch.channels_last) and not torch.equal(a, b)
    gpu = torch.cat([x for x, _ in build_eval_loader(cfg, "test", batch_size=100, device=dev)]).cpu()
    cpu = torch.cat([x for x, _ in build_eval_loader(cfg, "test", batch_size=100, device=CPU)])
    torch.testing.assert_close(gpu, cpu, atol=0.05, rtol=0)
    loader = build_train_loader(cfg, batch_size=64, device=dev)
    next(iter(loader))
    resumed = build_train_loader(cfg, batch_size=64, device=dev)
    resumed.load_state_dict(loader.state_dict())
    assert torch.equal(next(iter(resumed))[0], next(iter(loader))[0])
