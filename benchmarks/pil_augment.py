"""The data-loading baseline: SimCLR's two-view augmentation the way most public SimCLR code does it, PIL + numpy in
``torch.utils.data.DataLoader`` worker processes, one image at a time.

Same augmentation as fastclr's DALI graph (:mod:`fastclr.data.augment`), parameters from the same
``AugmentConfig``: random resized crop (area/aspect ranges, ten tries then the centre crop, bilinear), horizontal
flip, colour jitter with probability p (brightness, contrast, saturation, hue in a random order per image),
grayscale with probability p, Gaussian blur with probability p (σ uniform, in output pixels), normalization to
float32 CHW. Written for this benchmark only; training never uses it.
"""
from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter


def random_resized_crop(img: Image.Image, size: int, area: tuple[float, float], aspect: tuple[float, float],
                        rng: random.Random) -> Image.Image:
    w, h = img.size
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(10):
        target = w * h * rng.uniform(*area)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    side = min(w, h)  # fallback: the centred square
    x, y = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side))


def _hue_shift(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` of the colour circle (-0.5..0.5) in HSV."""
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(shift * 255))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def color_jitter(img: Image.Image, s: float, rng: random.Random) -> Image.Image:
    lo, hi = max(0.0, 1 - 0.8 * s), 1 + 0.8 * s
    ops = [lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(lo, hi)),
           lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(lo, hi)),
           lambda im: ImageEnhance.Color(im).enhance(rng.uniform(lo, hi)),
           lambda im: _hue_shift(im, rng.uniform(-0.2 * s, 0.2 * s))]
    rng.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


class TwoViewPIL:
    """``view(img)`` → one augmented float32 CHW view."""

    def __init__(self, aug, image_size: int, seed: int = 0):
        self.aug, self.size = aug, image_size
        self.rng = random.Random(seed)
        self.mean = np.array(aug.mean, np.float32) * 255
        self.inv_std = 1.0 / (np.array(aug.std, np.float32) * 255)

    def view(self, img: Image.Image) -> torch.Tensor:
        a, rng = self.aug, self.rng
        img = random_resized_crop(img, self.size, a.crop_area, a.crop_aspect, rng)
        if rng.random() < a.flip_p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if a.jitter_p > 0 and rng.random() < a.jitter_p:
            img = color_jitter(img, a.jitter_strength, rng)
        if rng.random() < a.grayscale_p:
            img = img.convert("L").convert("RGB")
        if a.blur_p > 0 and rng.random() < a.blur_p:
            img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*a.blur_sigma)))
        x = (np.asarray(img, np.float32) - self.mean) * self.inv_std
        return torch.from_numpy(x.transpose(2, 0, 1).copy())


class EncodedTwoViews(torch.utils.data.Dataset):
    """Encoded images in memory → (view_a, view_b): decode once, two views."""

    def __init__(self, encoded: list[bytes], aug, image_size: int):
        self.encoded, self.aug, self.size = encoded, aug, image_size
        self.views = TwoViewPIL(aug, image_size)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int):
        img = Image.open(io.BytesIO(self.encoded[i])).convert("RGB")
        return self.views.view(img), self.views.view(img)


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.views.rng.seed(info.seed)


def pil_loader(encoded: list[bytes], aug, image_size: int, *, batch_size: int, workers: int):
    """The baseline DataLoader: shuffled, ``workers`` processes, pinned memory off (CPU), persistent workers."""
    return torch.utils.data.DataLoader(EncodedTwoViews(encoded, aug, image_size), batch_size=batch_size,
                                       shuffle=True, num_workers=workers, drop_last=True, worker_init_fn=_seed_worker,
                                       persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)
