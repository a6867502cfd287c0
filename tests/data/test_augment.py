"""Statistical and reference checks of the SimCLR view graph, on synthetic images where each operator's effect is
measurable. Each test runs >= 2,048 samples through ``random_view`` + ``normalize`` with the other operators off."""
import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types

from fastclr.config import AugmentConfig
from fastclr.data.augment import blur_kernel_size, default_eval_resize, normalize, random_view

N_BATCH, N_ITERS = 512, 4  # 2,048 samples per test
RATE_TOL = 0.03
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # normalize to x/255: outputs read back as exact uint8
OFF = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
FULL = dict(crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0))  # the crop is the whole image: resize to the same size

# RGB <-> YIQ (NTSC 1953); DALI's hsv operator is a linear map in this space.
YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def run_views(images: np.ndarray, aug: AugmentConfig, size: int, seed: int = 7, **view_kw):
    """Run one view per sample for N_BATCH·N_ITERS samples, cycling through ``images``.
    Returns (views (n, size, size, 3) uint8 read back from x/255, {param name: (n,) array}, source indices)."""
    assert aug.mean == RAW["mean"] and aug.std == RAW["std"]
    src = np.stack([images[i % len(images)] for i in range(N_BATCH)])
    names: list = []

    @pipeline_def(batch_size=N_BATCH, num_threads=2, device_id=None, seed=seed, enable_conditionals=aug.blur_p > 0)
    def graph():
        x = fn.external_source(source=lambda: src, batch=True, layout="HWC")
        params: dict = {}
        view, flip = random_view(x, aug, size, device="cpu", params=params, **view_kw)
        names.extend(params)
        return (normalize(view, aug, dtype=types.FLOAT, channels_last=True, mirror=flip), *params.values())

    pipe = graph()
    pipe.build()
    views, params = [], {k: [] for k in names}
    for _ in range(N_ITERS):
        out = pipe.run()
        views.append(np.round(np.array(out[0].as_tensor()) * 255).astype(np.uint8))
        for k, tl in zip(names, out[1:]):
            params[k].append(np.array(tl.as_tensor()).reshape(N_BATCH))
    idx = np.tile(np.arange(N_BATCH) % len(images), N_ITERS)
    return np.concatenate(views), {k: np.concatenate(v) for k, v in params.items()}, idx


def test_blur_kernel_size_is_odd_tenth_of_side():
    assert blur_kernel_size(224, 0.1) == 23  # google-research/simclr: kernel_size = 224 // 10 → radius 11
    assert blur_kernel_size(96, 0.1) == 9
    assert blur_kernel_size(32, 0.1) == 3
    assert blur_kernel_size(8, 0.1) == 3
    assert all(blur_kernel_size(s, f) % 2 == 1 for s in range(8, 300, 7) for f in (0.05, 0.1, 0.33))
    assert default_eval_resize(224, 0) == 256 and default_eval_resize(32, 0) == 37 and default_eval_resize(32, 40) == 40


def dali_crop_scheme(H, W, area, aspect, n, rng, attempts=10):
    """Monte-Carlo of DALI's RandomCropGenerator (dali/util/random_crop_generator.cc), written from its description:
    area fraction uniform, aspect log-uniform, w/h rounded, first of 10 attempts that fits (size and rounded aspect),
    else the whole image (square images: its aspect 1 is always in range). Returns (area fraction, w/h)."""
    scale = rng.uniform(area[0], area[1], (n, attempts))
    ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1]), (n, attempts)))
    w = np.maximum(1, np.round(np.sqrt(scale * H * W * ratio)))
    h = np.maximum(1, np.round(np.sqrt(scale * H * W / ratio)))
    ok = (w <= W) & (h <= H) & (w / h >= np.float32(aspect[0])) & (w / h <= np.float32(aspect[1]))
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    w_sel = np.where(ok.any(axis=1), w[rows, first], W * np.sqrt(min(1.0, area[1])))
    h_sel = np.where(ok.any(axis=1), h[rows, first], H * np.sqrt(min(1.0, area[1])))
    return w_sel * h_sel / (H * W), w_sel / h_sel


@pytest.mark.parametrize("area", [(0.08, 1.0), (0.3, 0.7)])
def test_random_resized_crop_area_and_aspect_follow_dali_scheme(area):
    # A coordinate ramp (R = x, G = y): a crop resized to S px reads R(j) = x0 + (j + 1/2)·w/S − 1/2, so the crop
    # width is (R(S−2) − R(1))·S/(S−3) (inner columns: the antialias filter of the outer ones is clipped at the
    # image border); the same for the height from G.
    H = W = 200
    S = 16
    ramp = np.zeros((1, H, W, 3), np.uint8)
    ramp[0, :, :, 0] = np.arange(W)[None, :]
    ramp[0, :, :, 1] = np.arange(H)[:, None]
    aug = AugmentConfig(crop_area=area, **OFF, **RAW)
    views, _, _ = run_views(ramp, aug, S)
    v = views.astype(np.float64)
    w = (v[:, :, S - 2, 0] - v[:, :, 1, 0]).mean(axis=1) * S / (S - 3)
    h = (v[:, S - 2, :, 1] - v[:, 1, :, 1]).mean(axis=1) * S / (S - 3)
    measured, measured_aspect = w * h / (H * W), w / h
    ref, ref_aspect = dali_crop_scheme(H, W, area, aug.crop_aspect, 200_000, np.random.default_rng(0))

    assert measured.min() > area[0] * 0.9 and measured.max() < area[1] * 1.03
    assert measured_aspect.min() > 0.75 * 0.95 and measured_aspect.max() < 4 / 3 * 1.05
    # Expected mean area from the Monte-Carlo (U(0.08, 1) alone would give 0.54; rejected tall/wide draws lower it).
    assert abs(measured.mean() - ref.mean()) < 0.015, (measured.mean(), ref.mean())
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(measured, q) - np.quantile(ref, q)) < 0.03, q
    assert abs(np.log(measured_aspect).mean() - np.log(ref_aspect).mean()) < 0.02


def test_flip_rate_and_effect():
    img = np.zeros((1, 16, 16, 3), np.uint8)
    img[0, :, :, :] = (np.arange(16) * 16)[None, :, None]  # brightness grows left to right
    views, p, _ = run_views(img, AugmentConfig(**FULL, **{**OFF, "flip_p": 0.5}, **RAW), 16)
    flipped = views[:, 0, 0, 0] > views[:, 0, -1, 0]
    np.testing.assert_array_equal(flipped, p["flip"].astype(bool))
    assert abs(flipped.mean() - 0.5) < RATE_TOL
    np.testing.assert_array_equal(views[flipped], img[:, :, ::-1].repeat(flipped.sum(), 0))
    np.testing.assert_array_equal(views[~flipped], img.repeat((~flipped).sum(), 0))


def colour_reference(x, b, c, s, hue_deg, gray, rounded=True):
    """torchvision-style jitter in the order used by the graph: brightness·contrast about the mean luma (clipped to
    [0, 255]; rounded to uint8 by brightness_contrast, kept in float by the on-device arithmetic), then saturation
    (0 if gray) and hue as a YIQ map (rounded)."""
    xf = x.astype(np.float64)
    center = (xf @ YIQ[0]).mean()
    y = np.clip(b * (center + c * (xf - center)), 0, 255)
    y = np.round(y) if rounded else y
    t = np.deg2rad(hue_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), np.sin(t)], [0, -np.sin(t), np.cos(t)]])
    sat = 0.0 if gray else s
    m = np.linalg.inv(YIQ) @ np.diag([1.0, sat, sat]) @ rot @ YIQ
    return np.clip(np.round(y @ m.T), 0, 255)


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu-argument", "on-device"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_colour_jitter_and_grayscale_match_reference(strength, on_device):
    """Both formulations of the contrast (the GPU's default keeps the crop's mean on the device) against the
    reference."""
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (8, 12, 12, 3)).astype(np.uint8)
    aug = AugmentConfig(**FULL, **{**OFF, "jitter_p": 0.8, "grayscale_p": 0.2}, jitter_strength=strength, **RAW)
    views, p, idx = run_views(imgs, aug, 12, contrast_on_device=on_device)
    jit, gray = p["jitter"].astype(bool), p["gray"].astype(bool)
    assert abs(jit.mean() - 0.8) < RATE_TOL and abs(gray.mean() - 0.2) < RATE_TOL
    assert abs((jit & gray).mean() - 0.16) < RATE_TOL  # independent coins

    lo, hi = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    for k in ("brightness", "contrast", "saturation"):
        f = p[k]
        assert np.all(f[~jit] == 1.0)
        assert f[jit].min() >= lo and f[jit].max() <= hi
        assert abs(f[jit].mean() - 1.0) < 0.03 and abs(f[jit].std() - (hi - lo) / np.sqrt(12)) < 0.03
    hue = p["hue"]
    assert np.all(hue[~jit] == 0) and np.abs(hue).max() <= 0.2 * strength * 360
    assert abs(hue[jit].std() - 0.4 * strength * 360 / np.sqrt(12)) < 0.05 * 0.4 * strength * 360

    for n in range(len(views)):
        ref = colour_reference(imgs[idx[n]], p["brightness"][n], p["contrast"][n], p["saturation"][n], p["hue"][n],
                               gray[n], rounded=not on_device)
        assert np.abs(views[n] - ref).max() <= 2, n
    untouched = ~jit & ~gray
    assert np.array_equal(views[untouched], imgs[idx[untouched]])
    g = views[gray].astype(int)  # DALI's float32 YIQ matrices leave at most one level between the channels
    assert np.abs(g - g[..., :1]).max() <= 1 and np.abs(views[~gray].astype(int) - views[~gray][..., :1]).max() > 50
    assert np.mean([not np.array_equal(views[n], imgs[idx[n]]) for n in np.flatnonzero(jit)]) > 0.99


def blur_reference(x, sigma, window):
    """Separable Gaussian (window taps, normalized) on the interior pixels only."""
    r = window // 2
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    xf = x.astype(np.float64)
    rows = sum(k[i] * xf[i:xf.shape[0] - 2 * r + i] for i in range(window))
    return sum(k[j] * rows[:, j:rows.shape[1] - 2 * r + j] for j in range(window))


def test_blur_rate_sigma_and_reference():
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (4, 20, 20, 3)).astype(np.uint8)
    aug = AugmentConfig(**FULL, **{**OFF, "blur_p": 0.5}, blur_kernel_frac=0.25, **RAW)  # window 5 at 20 px
    window = blur_kernel_size(20, 0.25)
    assert window == 5
    views, p, idx = run_views(imgs, aug, 20)
    blur, sigma = p["blur"].astype(bool), p["sigma"]
    assert abs(blur.mean() - 0.5) < RATE_TOL
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.03
    r = window // 2
    # Each sample's window stops at ±4σ, never wider than the paper's; the tail it drops is below one level.
    np.testing.assert_array_equal(p["window"], np.minimum(window, 2 * np.ceil(4 * sigma) + 1))
    assert (p["window"][blur] < window).any()
    for n in range(len(views)):
        if blur[n]:
            d = r - int(p["window"][n]) // 2  # a narrower window has a wider interior: compare the same pixels
            ref = blur_reference(imgs[idx[n]], sigma[n], int(p["window"][n]))
            ref = ref[d:ref.shape[0] - d, d:ref.shape[1] - d]
            assert np.abs(views[n][r:-r, r:-r] - ref).max() <= 1.0, n
            full = blur_reference(imgs[idx[n]], sigma[n], window)
            assert np.abs(views[n][r:-r, r:-r] - full).max() <= 1.0, n
        else:
            assert np.array_equal(views[n], imgs[idx[n]])
    # Detectable effect with the rate: sigma >= 1 smooths the noise image visibly.
    strong = blur & (sigma > 1.0)
    spread = views.reshape(len(views), -1).astype(np.float64).std(axis=1)
    assert np.all(spread[strong] < 0.8 * spread[~blur].min())


def test_blur_p_zero_builds_no_blur_operator():
    aug = AugmentConfig(blur_p=0.0, **RAW)

    @pipeline_def(batch_size=2, num_threads=1, device_id=None, seed=0)
    def graph():
        x = fn.external_source(source=lambda: np.zeros((2, 8, 8, 3), np.uint8), batch=True, layout="HWC")
        params: dict = {}
        view, flip = random_view(x, aug, 8, device="cpu", params=params)
        assert "blur" not in params and "sigma" not in params
        return normalize(view, aug, dtype=types.FLOAT, channels_last=True, mirror=flip)

    pipe = graph()
    pipe.build()
    assert b"GaussianBlur" not in pipe.serialize()


def _gpu_to_cpu_edges(pipe) -> list[str]:
    """Operators on the CPU fed by a GPU operator's output (a ``.cpu()`` copy, invisible in the operator list)."""
    def source_device(node):
        return getattr(getattr(node.source, "_op", None), "device", None)

    return [f"{op._op.schema_name} <- {i.name}" for op in pipe._ops if op._op.device == "cpu"
            for i in op._inputs if source_device(i) == "gpu"]


def test_the_edge_check_sees_a_device_to_host_copy():
    @pipeline_def
    def with_copy():
        x = fn.external_source(source=lambda: None, batch=True, dtype=types.UINT8, ndim=3, layout="HWC").gpu()
        center = fn.reductions.mean(x, axes=(0, 1)).cpu()[0]  # what the colour jitter once did
        return fn.brightness_contrast(x, contrast_center=center)

    pipe = with_copy(batch_size=2, num_threads=1, device_id=0)
    pipe._build_graph()
    edges = _gpu_to_cpu_edges(pipe)
    assert len(edges) == 1 and edges[0].startswith("_TensorSubscript <- "), edges


@pytest.mark.parametrize("encoded", [True, False])
def test_gpu_graph_places_every_image_operator_on_the_gpu(encoded):
    """Traced without a GPU (graph construction only, no build): decode is 'mixed', every image operator 'gpu', and
    only external sources, random draws and argument arithmetic stay on the CPU."""
    from fastclr.data.augment import two_view_graph

    pipe = two_view_graph(read_batch=lambda info: None, encoded=encoded, aug=AugmentConfig(), image_size=32,
                          device="gpu", dtype=types.FLOAT16, channels_last=True, batch_size=4, num_threads=1,
                          device_id=0, seed=1, enable_conditionals=True)
    pipe._build_graph()  # DALI's graph tracing step of build(); the backend (which needs CUDA) is not touched
    devices: dict = {}
    for op in pipe._ops:
        name = getattr(op._op, "schema_name", type(op._op).__name__)  # ExternalSource is a Python class
        devices.setdefault(name, set()).add(op._op.device)
    image_ops = ("RandomResizedCrop", "Hsv", "GaussianBlur", "CropMirrorNormalize", "reductions__Mean",
                 "_conditional__Merge")
    for name in image_ops:
        assert devices.pop(name) == {"gpu"}, name
    # The crop's mean luma stays on the GPU: no operator brings GPU data back to the host (once, a `.cpu()` of the
    # per-crop means fed brightness_contrast's contrast_center: a device-to-host copy every iteration).
    assert not _gpu_to_cpu_edges(pipe)
    assert devices.pop("decoders__Image", {"mixed"}) == {"mixed"}
    assert devices.pop("_conditional__Split") == {"cpu", "gpu"}  # the images split on the GPU, sigma on the CPU
    assert devices.pop("_ArithmeticGenericOp") == {"cpu", "gpu"}  # drawn factors on the CPU; pixels, luma on the GPU
    assert devices.pop("_TensorSubscript") == {"gpu"}  # the per-crop means' channels
    assert all(d == {"cpu"} for d in devices.values()), devices
    assert set(devices) <= {"ExternalSource", "random__CoinFlip", "random__Uniform", "_ArithmeticGenericOp",
                            "_TensorSubscript", "Cast"}
