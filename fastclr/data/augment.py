"""The SimCLR augmentation as one DALI graph for CPU and GPU (Chen et al. 2020, appendix A).

Each image is decoded once (``mixed`` decoder on GPU, ``cpu`` otherwise) and two independent views are drawn from
it: random resized crop → horizontal flip → colour jitter with probability p → grayscale with probability p →
Gaussian blur with probability p → normalize. Every random value is drawn per sample by DALI's own random operators,
seeded from the pipeline seed, so a pipeline checkpoint captures the whole augmentation state.

Applying an operator "with probability p" (DALI has no per-sample ``if`` outside conditional execution):

* jitter and grayscale: blended parameters, not branches. The coin turns the drawn factors into the identity
  (factor 1, hue 0) and grayscale is saturation 0, so both fold into the same two colour operators. Those are single
  cheap passes; splitting the batch into branches and merging it again costs about as much as the pass it saves.
* blur: conditional execution (``if coin:``), because the blur is by far the most expensive operator and a branch
  skips it for the unselected half. Measured on 2 CPU threads, 224 px, two views: no blur 550 images/s, blur on
  every sample 94, per-sample window size 1 for unselected samples 124, conditional branch 144. With ``blur_p == 0``
  (32-px recipes) the operator is not built at all and conditionals stay off. Each sample's window also ends at
  ±4σ instead of the paper's fixed 10% of the side (see ``BLUR_TRUNCATE``): the full ImageNet-recipe graph went
  from 105 to 195 images/s on 2 CPU threads (640×427 JPEGs, 224-px views) with pixels unchanged to < 0.05 level.
"""
from __future__ import annotations

import math

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

BLUR_TRUNCATE = 4.0
"""Gaussian blur windows end at ±4σ (or the paper's 10% of the side, whichever is narrower)."""
LUMA = (0.299, 0.587, 0.114)
"""Rec. 601 luma weights: torchvision's grayscale, and the Y row of the YIQ space DALI's hsv operator works in."""


def blur_kernel_size(image_size: int, frac: float) -> int:
    """Odd blur window ≈ ``frac`` of the side, at least 3: 2·⌊⌊frac·S⌋/2⌋ + 1 (google-research/simclr: 23 at 224,
    9 at 96, 3 at 32)."""
    return max(3, 2 * (int(frac * image_size) // 2) + 1)


def _factor(coin, lo: float, hi: float):
    """A factor uniform in [lo, hi] where the coin is 1, exactly 1 (identity) where it is 0."""
    return 1.0 + coin * (fn.random.uniform(range=(lo, hi)) - 1.0)


def random_view(images, aug, image_size: int, *, device: str, params: dict | None = None,
                contrast_on_device: bool | None = None):
    """One augmented view of a batch of decoded HWC uint8 images; returns (HWC uint8 view, horizontal-flip coin).

    The flip is returned, not applied, so that it fuses into the normalization (crop_mirror_normalize's ``mirror``).
    If ``params`` is a dict it receives each per-sample random value as a DataNode (for tests and diagnostics).
    ``contrast_on_device``: the contrast about each crop's mean luma as arithmetic on the images' device (default on
    the GPU) instead of brightness_contrast with the mean as a CPU argument (default on the CPU); tests run both.
    """
    params = {} if params is None else params
    if contrast_on_device is None:
        contrast_on_device = device == "gpu"
    images = fn.random_resized_crop(images, device=device, size=(image_size, image_size),
                                    random_area=aug.crop_area, random_aspect_ratio=aug.crop_aspect,
                                    antialias=True)
    params["flip"] = flip = fn.random.coin_flip(probability=aug.flip_p)

    # Colour jitter (torchvision ColorJitter semantics, factors in [max(0, 1 - 0.8s), 1 + 0.8s], hue ±0.2s of the
    # colour circle). Fixed order: brightness and contrast (one operator), then saturation and hue (one operator),
    # then grayscale (folded into saturation 0). The paper randomizes the order of the four jitter ops; here that is
    # unnecessary up to clipping: contrast blends towards the image's *mean* luma, hue/saturation act on the
    # chroma plane of YIQ and keep luma, grayscale zeroes the chroma, and brightness scales everything — four linear
    # maps that commute, so every order gives the same image except for where intermediate values would clip at
    # 0/255. (DALI's hue is a rotation in YIQ, a linear stand-in for torchvision's HSV hue shift.)
    s = aug.jitter_strength
    jitter_on = aug.jitter_p > 0 and s > 0
    gray_on = aug.grayscale_p > 0
    saturation = None
    if jitter_on:
        params["jitter"] = jit = fn.random.coin_flip(probability=aug.jitter_p)
        params["brightness"] = brightness = _factor(jit, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)
        params["contrast"] = contrast = _factor(jit, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)
        params["saturation"] = saturation = _factor(jit, max(0.0, 1 - 0.8 * s), 1 + 0.8 * s)
        params["hue"] = hue = jit * fn.random.uniform(range=(-0.2 * s * 360.0, 0.2 * s * 360.0))  # degrees
        # out = brightness · (center + contrast · (in − center)): the contrast keeps the crop's mean luma, as
        # torchvision's.
        means = fn.reductions.mean(images, axes=(0, 1))  # (3,) per-channel means of each crop, on its device
        center = means[0] * LUMA[0] + means[1] * LUMA[1] + means[2] * LUMA[2]  # () mean luma
        if contrast_on_device:
            # As gain · in + shift in DALI's arithmetic: operator arguments (brightness_contrast's contrast_center)
            # must be CPU values, and the mean of a GPU crop would come back to the host every iteration. Here it
            # never leaves the device; only the drawn factors go the other way (bytes per sample, no wait). float32
            # HWC, clipped as brightness_contrast clips; the hsv below rounds it back to uint8. (On the CPU the fused
            # operator is the cheaper one: 183 vs 161 images/s for the 224-px two-view graph, 2 threads.)
            gain, keep = brightness * contrast, brightness * (1.0 - contrast)  # CPU scalars per sample
            if device == "gpu":
                gain, keep = gain.gpu(), keep.gpu()
            images = dmath.clamp(images * gain + keep * center, 0.0, 255.0)
        else:
            images = fn.brightness_contrast(images, brightness=brightness, contrast=contrast, contrast_center=center)
    if gray_on:
        params["gray"] = gray = fn.random.coin_flip(probability=aug.grayscale_p)
        saturation = (1 - gray) * (saturation if saturation is not None else 1.0)
    if jitter_on:
        images = fn.hsv(images, hue=hue, saturation=saturation, dtype=types.UINT8)  # uint8 in or float32 in
    elif gray_on:
        images = fn.hsv(images, saturation=saturation)

    if aug.blur_p > 0:
        params["blur"] = blur = fn.random.coin_flip(probability=aug.blur_p, dtype=types.BOOL)
        params["sigma"] = sigma = fn.random.uniform(range=aug.blur_sigma)
        # The paper's window (10% of the side) holds ±11 px at 224, but σ ≤ 2 puts all but 6e-5 of the kernel's
        # mass within ±4σ: each sample's window is cut there (never wider than the paper's). The dropped tail moves
        # a pixel by < 0.05 of an 8-bit level, and the blur costs half as much (it is the dearest operator).
        params["window"] = window = fn.cast(
            dmath.min(2.0 * dmath.ceil(BLUR_TRUNCATE * sigma) + 1.0,
                      float(blur_kernel_size(image_size, aug.blur_kernel_frac))), dtype=types.INT32)
        if blur:  # conditional execution: only the selected samples are blurred
            images = fn.gaussian_blur(images, window_size=window, sigma=sigma)
    return images, flip


def normalize(images, aug, *, dtype, channels_last: bool, mirror=None, crop: int | None = None):
    """(x/255 − mean)/std per channel, optional centre crop and mirror, in one pass; NHWC or NCHW output."""
    kw = {} if mirror is None else {"mirror": mirror}
    if crop is not None:
        kw["crop"] = (crop, crop)  # centred: crop_pos_x/y default to 0.5
    return fn.crop_mirror_normalize(images, mean=[255.0 * m for m in aug.mean], std=[255.0 * v for v in aug.std],
                                    dtype=dtype, output_layout="HWC" if channels_last else "CHW", **kw)


def _decoded(read_batch, encoded: bool, device: str):
    """External source (the loader's callback, given DALI's BatchInfo) → decoded HWC uint8 images on ``device``."""
    if encoded:
        data = fn.external_source(source=read_batch, batch=True, batch_info=True, dtype=types.UINT8, ndim=1)
        return fn.decoders.image(data, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    images = fn.external_source(source=read_batch, batch=True, batch_info=True, dtype=types.UINT8, ndim=3,
                                layout="HWC")
    return images.gpu() if device == "gpu" else images


@pipeline_def
def two_view_graph(read_batch, encoded: bool, aug, image_size: int, device: str, dtype, channels_last: bool):
    """Decode once, two independent SimCLR views, each normalized: outputs (view_a, view_b)."""
    images = _decoded(read_batch, encoded, device)
    a, flip_a = random_view(images, aug, image_size, device=device)
    b, flip_b = random_view(images, aug, image_size, device=device)
    return (normalize(a, aug, dtype=dtype, channels_last=channels_last, mirror=flip_a),
            normalize(b, aug, dtype=dtype, channels_last=channels_last, mirror=flip_b))


@pipeline_def
def eval_graph(read_batch, encoded: bool, aug, image_size: int, resize_to: int, device: str, dtype,
               channels_last: bool):
    """Deterministic: shorter side → ``resize_to`` (→ ``image_size`` for images whose shorter side is already
    ≤ ``image_size``), centre crop ``image_size``, normalize."""
    images = _decoded(read_batch, encoded, device)
    shape = images.shape(dtype=types.FLOAT)  # (H, W, C), always a CPU node
    shorter = dmath.min(shape[0], shape[1])
    small = fn.cast(shorter <= image_size, dtype=types.FLOAT)
    target = small * image_size + (1.0 - small) * resize_to
    images = fn.resize(images, resize_shorter=target, antialias=True)
    return normalize(images, aug, dtype=dtype, channels_last=channels_last, crop=image_size)


def default_eval_resize(image_size: int, eval_resize: int) -> int:
    """``eval_resize`` or the usual 8/7 ratio (256 → 224 crop)."""
    return eval_resize or int(math.floor(image_size * 8 / 7 + 0.5))
