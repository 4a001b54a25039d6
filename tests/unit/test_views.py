"""Views: the per-sample torchvision path (views.py) and the batched path (augment.py).

The batched ops are checked against torchvision.transforms.v2.functional (an independent reference)
and the batched sampling against the distributions torchvision draws from.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from leoclr_core.views import batched as A
from leoclr_core.spec.models import AugmentSpec
from leoclr_core.views.transforms import (RandomGaussianBlur, TripleViewTransform, TwoViewTransform,
                               make_view_transform)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PLAIN = AugmentSpec(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0)  # crops only
NO_ORIGINAL_AUG = AugmentSpec(original_photometric=False, original_flip=False)


def smooth_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 (b, 3, h, w) low-frequency images, so resampling methods agree closely."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 5, 5, generator=g)
    smooth = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=True).clamp(0, 1)
    return (smooth * 255).round().byte()


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    shape = (3, 1, 1) if x.ndim == 3 else (1, 3, 1, 1)
    return x * torch.tensor(STD).view(shape) + torch.tensor(MEAN).view(shape)


def normalise(x01: torch.Tensor) -> torch.Tensor:
    return TF.normalize(x01, list(MEAN), list(STD))


# ---------------------------------------------------------------- per-sample path
@pytest.mark.parametrize("make_input", [lambda t: t, lambda t: Image.fromarray(t.permute(1, 2, 0).numpy())])
def test_triple_views_shapes_and_range(make_input):
    image = smooth_images(1, 48, 40)[0]
    views = TripleViewTransform(AugmentSpec(), 32, MEAN, STD)(make_input(image))
    assert len(views) == 3
    for v in views:
        assert type(v) is torch.Tensor and v.shape == (3, 32, 32) and v.dtype == torch.float32
        raw = unnormalise(v)
        assert torch.isfinite(v).all() and raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert not torch.allclose(views[1], views[2])


def test_original_view_is_square_resize_when_its_aug_is_off():
    image = smooth_images(1, 48, 40)[0]
    x, x1, _ = TripleViewTransform(NO_ORIGINAL_AUG, 32, MEAN, STD)(image)
    expected = normalise(TF.to_dtype(TF.resize(image, [32, 32], antialias=True), torch.float32, scale=True))
    torch.testing.assert_close(x, expected)
    assert not torch.allclose(x, x1)


def test_two_views_and_method_dispatch():
    image = smooth_images(1, 40, 40)[0]
    x1, x2 = TwoViewTransform(AugmentSpec(), 24, MEAN, STD)(image)
    assert x1.shape == x2.shape == (3, 24, 24) and not torch.allclose(x1, x2)
    assert isinstance(make_view_transform("leoclr", AugmentSpec(), 24, MEAN, STD), TripleViewTransform)
    assert isinstance(make_view_transform("mocov2", AugmentSpec(), 24, MEAN, STD), TwoViewTransform)
    with pytest.raises(ValueError, match="unknown method"):
        make_view_transform("simclr", AugmentSpec(), 24, MEAN, STD)


def test_greyscale_pil_input_becomes_rgb():
    pil = Image.fromarray(np.full((20, 30), 128, dtype=np.uint8), mode="L")
    assert all(v.shape == (3, 16, 16) for v in TripleViewTransform(NO_ORIGINAL_AUG, 16, MEAN, STD)(pil))


@pytest.mark.parametrize("size, mean, std, match", [
    (0, MEAN, STD, "size"), (32, MEAN[:2], STD, "per RGB channel"), (32, MEAN, (0.2, 0.0, 0.2), "positive"),
])
def test_impossible_constructor_values(size, mean, std, match):
    for make in (lambda: TripleViewTransform(AugmentSpec(), size, mean, std),
                 lambda: A.BatchedViews(AugmentSpec(), size, mean, std)):
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(ValueError, match="kinds"):
        A.BatchedViews(AugmentSpec(), 32, MEAN, STD, kinds=("original", "zoom"))


def test_per_sample_blur_matches_torchvision():
    image = torch.rand(3, 40, 36)
    blurred = RandomGaussianBlur(7, (1.3, 1.3), p=1.0)(image)
    torch.testing.assert_close(blurred, TF.gaussian_blur(image, [7, 7], [1.3, 1.3]), atol=1e-5, rtol=0)
    assert RandomGaussianBlur(7, (1.3, 1.3), p=0.0)(image) is image


# ---------------------------------------------------------------- batched path: end to end
@pytest.mark.parametrize("b, h, w", [(1, 64, 64), (5, 48, 80)])
def test_batched_views_shapes_range_and_difference(b, h, w):
    images = smooth_images(b, h, w)
    views = A.BatchedViews(AugmentSpec(), 32, MEAN, STD)(images, torch.Generator().manual_seed(0))
    assert len(views) == 3
    for v in views:
        assert v.shape == (b, 3, 32, 32) and v.dtype == torch.float32 and torch.isfinite(v).all()
        raw = unnormalise(v)
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert not torch.allclose(views[1], views[2])


def test_batched_original_is_square_resize_when_its_aug_is_off():
    images = smooth_images(4, 64, 64)
    x, x1, x2 = A.BatchedViews(NO_ORIGINAL_AUG, 32, MEAN, STD)(images, torch.Generator().manual_seed(1))
    # roi_align with adaptive sampling averages 2x2 blocks: exactly an area resize for 64 -> 32.
    area = F.interpolate(images.float() / 255, size=(32, 32), mode="area")
    torch.testing.assert_close(x, normalise(area), atol=1e-5, rtol=0)
    assert not torch.allclose(x, x1)
    # Non-square source, non-integer factor: close to torchvision's antialiased resize.
    images = smooth_images(4, 48, 80)
    (x,) = A.BatchedViews(PLAIN, 32, MEAN, STD, kinds=("original",))(images)
    reference = TF.resize(images.float() / 255, [32, 32], antialias=True)
    assert (unnormalise(x) - reference).abs().max() < 0.02


def test_mocov2_kinds_and_float_input():
    images = smooth_images(3, 40, 40)
    g = torch.Generator().manual_seed(3)
    x1, x2 = A.BatchedViews(AugmentSpec(), 24, MEAN, STD, kinds=("crop", "crop"))(images.float() / 255, g)
    assert x1.shape == x2.shape == (3, 3, 24, 24) and not torch.allclose(x1, x2)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        A.BatchedViews(AugmentSpec(), 24, MEAN, STD)(images[0])


def test_generator_reproducibility_and_cpu_chunks(monkeypatch):
    images = smooth_images(6, 40, 56)
    views = A.BatchedViews(AugmentSpec(), 32, MEAN, STD)
    a = views(images, torch.Generator().manual_seed(7))
    b = views(images, torch.Generator().manual_seed(7))
    c = views(images, torch.Generator().manual_seed(8))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[1], c[1])
    monkeypatch.setattr(A, "_CPU_CHUNK_FLOATS", 3 * 32 * 32 * 4)  # 4 views per chunk: same result
    for u, v in zip(a, views(images, torch.Generator().manual_seed(7))):
        torch.testing.assert_close(u, v)



def test_packed_params_cross_in_one_tensor_unchanged():
    # What a CUDA batch receives: every sampled parameter, packed into one float tensor and cut back.
    views = A.BatchedViews(AugmentSpec(hue=0.1), 32, MEAN, STD)
    boxes, params = views.sample(50, 48, 64, torch.Generator().manual_seed(3), "cpu")
    packed = params.pack(boxes)
    assert packed.shape == (150, A.PACKED_COLUMNS) and packed.dtype == torch.float32
    boxes2, params2 = A.ViewParams.unpack(packed)
    assert torch.equal(boxes2, boxes)
    for name in A.ViewParams.__dataclass_fields__:
        ours, theirs = getattr(params2, name), getattr(params, name)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name


def test_views_without_a_generator_follow_the_global_cpu_seed():
    images = smooth_images(4, 40, 40)
    views = A.BatchedViews(AugmentSpec(), 32, MEAN, STD)
    torch.manual_seed(11)
    a = views(images)
    torch.manual_seed(11)
    for u, v in zip(a, views(images)):
        assert torch.equal(u, v)

# ---------------------------------------------------------------- batched path: sampled distributions
@pytest.mark.parametrize("h, w, scale, ratio", [
    (64, 64, (0.2, 1.0), (3 / 4, 4 / 3)),
    (40, 100, (0.3, 1.0), (3 / 4, 4 / 3)),  # wide: most proposals fail, about 1 row in 10 falls back
])
def test_crop_boxes_match_random_resized_crop(h, w, scale, ratio):
    n = 4000
    boxes = A.sample_crop_boxes(n, h, w, scale, ratio, torch.Generator().manual_seed(0))
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.equal(boxes, boxes.round()) and (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all() and (bw > 0).all() and (bh > 0).all()
    torch.manual_seed(0)
    image = torch.zeros(1, h, w)
    get_params = v2.RandomResizedCrop.get_params
    ref = torch.tensor([get_params(image, list(scale), list(ratio))[2:] for _ in range(n)])
    rh, rw = ref[:, 0].float(), ref[:, 1].float()
    ours = {"area": bw * bh / (h * w), "log_ratio": torch.log(bw / bh)}
    theirs = {"area": rw * rh / (h * w), "log_ratio": torch.log(rw / rh)}
    for key in ("area", "log_ratio"):
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        assert abs(ours[key].mean() - theirs[key].mean()) < 0.02, key
        assert (ours[key].quantile(q) - theirs[key].quantile(q)).abs().max() < 0.04, key
    # Offsets are uniform over the valid integer range: the centred rank has mean 1/2.
    assert abs(((boxes[:, 0] + 0.5) / (w - bw + 1)).mean() - 0.5) < 0.02
    assert abs(((boxes[:, 1] + 0.5) / (h - bh + 1)).mean() - 0.5) < 0.02


def test_crop_fallback_is_central():
    # No proposal can fit: a 10 x 100 strip with ratios near 1 -> the central, ratio-clipped box.
    boxes = A.sample_crop_boxes(50, 10, 100, (0.9, 1.0), (0.9, 1.1), torch.Generator().manual_seed(0))
    reference = v2.RandomResizedCrop.get_params(torch.zeros(1, 10, 100), [0.9, 1.0], [0.9, 1.1])
    assert reference == (0, 44, 10, 11)  # top, left, height, width
    assert torch.equal(boxes, torch.tensor([44.0, 0.0, 55.0, 10.0]).expand(50, 4))


def test_view_param_rates_and_ranges():
    aug = AugmentSpec(brightness=0.4, contrast=0.3, saturation=0.2, hue=0.1, jitter_p=0.8,
                      grayscale_p=0.2, blur_p=0.5, flip_p=0.3, blur_sigma=(0.1, 2.0))
    n = 20000
    p = A.sample_view_params(n, aug, torch.Generator().manual_seed(0))
    tol = 4 * math.sqrt(0.25 / n)
    rates = {"flip": 0.3, "jitter": 0.8, "grayscale": 0.2, "blur": 0.5}
    for name, rate in rates.items():
        assert abs(getattr(p, name).float().mean().item() - rate) < tol, name
    joint = (p.grayscale & p.jitter).float().mean().item()
    assert abs(joint - 0.2 * 0.8) < tol  # grayscale is drawn independently of jitter
    f = p.factors[p.jitter]
    for col, strength in enumerate((0.4, 0.3, 0.2)):
        assert f[:, col].min() >= 1 - strength and f[:, col].max() <= 1 + strength
        assert abs(f[:, col].mean().item() - 1) < 0.01
    assert f[:, 3].abs().max() <= 0.1 and abs(f[:, 3].mean().item()) < 0.005
    assert (p.factors[~p.jitter] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
    assert (p.sigma >= 0.1).all() and (p.sigma <= 2.0).all() and abs(p.sigma.mean().item() - 1.05) < 0.02
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    hue_position = (p.order == A.HUE).float().argmax(dim=1)
    for pos in range(4):  # every op order is equally likely, e.g. where hue lands
        assert abs((hue_position == pos).float().mean().item() - 0.25) < tol


def test_original_view_options_switch_its_params_off():
    aug = AugmentSpec(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0, flip_p=1.0)
    p = A.sample_view_params(100, aug, torch.Generator().manual_seed(0), photometric=False, flip=False)
    assert not (p.flip | p.jitter | p.grayscale | p.blur).any()
    assert torch.equal(p.factors, torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(100, 4))
    p = A.sample_view_params(100, aug, torch.Generator().manual_seed(0), photometric=True, flip=False)
    assert not p.flip.any() and (p.jitter & p.grayscale & p.blur).all()


# ---------------------------------------------------------------- batched ops vs torchvision
@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 12, 10, generator=g)
    x[0] = x[0, :1]  # a grey image
    x[1, 1] = x[1, 0]  # ties between channels
    return x


# Brightness, contrast and saturation as `color_jitter` makes them: a blend toward black, the mean
# grey, the greyscale image.
def _brightness(x, factor):
    return A.blend(x, torch.zeros_like(x[:1, :1, :1, :1]), factor)


def _contrast(x, factor):
    return A.blend(x, A.grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _saturation(x, factor):
    return A.blend(x, A.grayscale(x), factor)


@pytest.mark.parametrize("ours, theirs, factors", [
    (_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4, 0.0, 0.9, 1.2]),
    (_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4, 0.0, 0.9, 1.2]),
    (_saturation, TF.adjust_saturation, [0.6, 1.0, 1.4, 0.0, 0.9, 1.2]),
    (A.adjust_hue, TF.adjust_hue, [0.1, -0.1, 0.5, -0.5, 0.0, 0.33]),
])
def test_colour_ops_match_torchvision(batch, ours, theirs, factors):
    out = ours(batch, torch.tensor(factors))
    expected = torch.stack([theirs(img, f) for img, f in zip(batch, factors)])
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


def test_grayscale_matches_torchvision(batch):
    torch.testing.assert_close(A.grayscale(batch), TF.rgb_to_grayscale(batch), atol=1e-6, rtol=0)


def test_color_jitter_follows_each_samples_order(batch):
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    orders = torch.tensor(list(itertools.permutations(range(4))))  # all 24
    x = batch[torch.arange(24) % len(batch)]
    factors = torch.tensor([1.3, 0.7, 1.4, 0.08]).repeat(24, 1)
    out = A.color_jitter(x, factors, orders)
    for img, order, result in zip(x, orders, out):
        for op in order.tolist():
            img = ops[op](img, factors[0, op].item())
        torch.testing.assert_close(result, img, atol=5e-5, rtol=0)
    neutral = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(24, 1)
    assert torch.equal(A.color_jitter(x, neutral, orders), x)


@pytest.mark.parametrize("small_conv", [1 << 30, 0], ids=["shifted-sums", "conv2d"])
def test_blur_matches_torchvision(batch, small_conv, monkeypatch):
    monkeypatch.setattr(A, "_CPU_SMALL_CONV", small_conv)  # both CPU implementations
    sigma = torch.tensor([0.3, 1.0, 2.0, 0.8, 1.5, 0.1])
    out = A.gaussian_blur(batch, sigma, 5)
    expected = torch.stack([TF.gaussian_blur(img, [5, 5], [s, s]) for img, s in zip(batch, sigma.tolist())])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    apply = torch.tensor([True, False, True, False, False, True])
    partly = A.gaussian_blur(batch, sigma, 5, apply)
    assert torch.equal(partly[~apply], batch[~apply])
    torch.testing.assert_close(partly[apply], expected[apply], atol=1e-5, rtol=0)


def test_blur_kernel_is_about_a_tenth_of_the_view():
    assert [A.blur_kernel_size(s) for s in (16, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]


@pytest.mark.parametrize("h, w, k", [(16, 16, 3), (12, 20, 5), (9, 7, 7), (64, 64, 23)])
def test_matmul_blur_equals_conv_blur(h, w, k):
    """The banded-matrix blur (the GPU path) reproduces the convolution, reflect padding included."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, h, w, generator=g)
    sigma = 0.1 + 1.9 * torch.rand(5, generator=g)
    apply = torch.tensor([True, False, True, True, False])
    torch.testing.assert_close(A.gaussian_blur_matmul(x, sigma, k, apply), A.gaussian_blur(x, sigma, k, apply),
                               atol=1e-6, rtol=0)
    assert torch.equal(A.gaussian_blur_matmul(x, sigma, k, apply)[~apply], x[~apply])


def test_blur_matrix_rows_sum_to_one_and_refuse_a_too_long_kernel():
    kernels = A.gaussian_kernels(torch.tensor([0.5, 2.0]), 7)
    m = A.blur_matrices(kernels, 10)
    torch.testing.assert_close(m.sum(dim=2), torch.ones(2, 10))
    with pytest.raises(ValueError, match="more than 3 px"):
        A.reflect_index(3, 7)


def _views_pair(dtype, blur="auto", compile=False):
    images = smooth_images(12, 40, 36, seed=3)
    out = []
    for d, c in ((torch.float32, False), (dtype, compile)):
        maker = A.BatchedViews(AugmentSpec(), 32, MEAN, STD, blur=blur, dtype=d, compile=c)
        out.append(maker(images, generator=torch.Generator().manual_seed(7)))
    return out


def test_half_precision_views_stay_close_to_float32():
    """float16 photometric ops (what a bf16 run on CUDA uses): same draws, errors below bf16 rounding."""
    full, half = _views_pair(torch.float16, blur="matmul")
    for a, b in zip(full, half):
        assert b.dtype == torch.float16 and torch.isfinite(b).all()
        err = (unnormalise(b.float()) - unnormalise(a)).abs()
        assert err.max() < 4 / 255 and err.mean() < 0.2 / 255


def test_views_refuse_unknown_blur_and_dtype():
    with pytest.raises(ValueError, match="blur must be one of"):
        A.BatchedViews(AugmentSpec(), 16, MEAN, STD, blur="fft")
    with pytest.raises(ValueError, match="dtype must be"):
        A.BatchedViews(AugmentSpec(), 16, MEAN, STD, dtype=torch.bfloat16)


@pytest.mark.slow
def test_compiled_views_equal_eager_views():
    """torch.compile fuses the ops (on a GPU); it must not change a view."""
    eager, compiled = _views_pair(torch.float32, compile=True)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
