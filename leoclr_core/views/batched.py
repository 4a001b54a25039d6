"""Batched LeOCLR / MoCo-v2 views: one call makes every view of a whole batch, on the batch's device.

Why this exists: contrastive pretraining needs two or three freshly augmented views of every image at
every step. Made per sample in DataLoader workers (views.py) that work is done by a few CPU cores, and
a GPU fed by them idles waiting for its next batch. Here each random choice is still drawn per sample,
from the same distributions as the torchvision path, but applied as whole-batch tensor ops: no Python
loop over samples and no host-device synchronisation, so it runs on the training device right before
the forward pass. The same code runs on CPU tensors; that is how it is tested on machines without a
GPU, and for small images it is also much faster than the per-sample CPU path.

Geometry uses `torchvision.ops.roi_align` with one box per view: the square resize of X is the box of
the whole image, a crop is RandomResizedCrop's box; all of them are sampled in one call straight from
the uint8 batch (converted to float once). With adaptive sampling (ceil(box side / output side)
sub-samples per output pixel, averaged) it antialiases downscaling (64 -> 32 px is an exact 2x2 mean),
where plain bilinear `grid_sample` would alias, and it needs no per-view copy of the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

if TYPE_CHECKING:  # read by attribute only, so this module needs nothing but torch and torchvision
    from leoclr_core.spec.models import AugmentSpec

# What a view is: the whole image, a random crop, or a window of the whole image at a crop's scale
# (spec.models.VIEW_KINDS says the same; a test checks they agree).
VIEW_KINDS = ("original", "crop", "window")
PACKED_COLUMNS = 18  # ViewParams.pack: box (5), factors (4), order (4), flags (4), sigma (1)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # column of each jitter factor; ids in `order`
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2 weights, as torchvision's rgb_to_grayscale
_CPU_SMALL_CONV = 1 << 20  # below this many multiply-adds per blur pass, shifted sums beat a CPU conv
_CPU_CHUNK_FLOATS = 1 << 19  # floats per CPU chunk of views: 2 MiB, half of a typical L2 cache


def blur_kernel_size(size: int) -> int:
    """MoCo-v2 blurs with a kernel about 10% of the view side (23 px at 224): odd, at least 3."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def check_view_args(size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[tuple, tuple]:
    """Validate what every view transform is built from; returns mean and std as 3-tuples of floats."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 4:
        raise ValueError(f"view size must be an integer >= 4, got {size!r}")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got {list(mean)} and {list(std)}")
    if any(not s > 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)}")
    return mean, std


# ---------------------------------------------------------------- parameter sampling
def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def sample_mask(n: int, p: float, generator=None, device=None) -> Tensor:
    """(n,) bool, each True with probability p (p=0 never, p=1 always)."""
    return _rand((n,), generator, device) < p


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """RandomResizedCrop's box when 10 tries fail: the whole image, clipped to the ratio range."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return width, int(round(width / ratio[0]))
    if in_ratio > ratio[1]:
        return int(round(height * ratio[1])), height
    return width, height


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float], generator=None, device=None, tries: int = 10) -> Tensor:
    """(n, 4) float boxes (x0, y0, x1, y1) in pixels, drawn like `RandomResizedCrop.get_params`.

    Each row makes `tries` proposals at once (area fraction ~ U(scale), log aspect ~ U(log ratio),
    integer sides) and keeps the first that fits; rows where none fits get the central fallback.
    """
    area = height * width
    frac = scale[0] + (scale[1] - scale[0]) * _rand((n, tries), generator, device)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * _rand((n, tries), generator, device))
    w = torch.sqrt(area * frac * aspect).round()
    h = torch.sqrt(area * frac / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting proposal
    found = fits.any(dim=1)
    fw, fh = _fallback_size(height, width, ratio)
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fw))
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fh))
    u = _rand((n, 2), generator, device)
    x0 = torch.minimum(torch.floor(u[:, 0] * (width - w + 1)), width - w)
    y0 = torch.minimum(torch.floor(u[:, 1] * (height - h + 1)), height - h)
    x0 = torch.where(found, x0, torch.div(width - w, 2, rounding_mode="floor"))
    y0 = torch.where(found, y0, torch.div(height - h, 2, rounding_mode="floor"))
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def sample_window_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                        generator=None, device=None) -> Tensor:
    """(n, 4) float boxes (x0, y0, x1, y1) of "window" views: the whole image resized at a crop's
    scale, then a view-sized window cut from it at a random place.

    In source pixels that is a box with the image's own aspect ratio whose area fraction a is drawn
    as a crop's (a ~ U(scale)): sides round(sqrt(a) * width) by round(sqrt(a) * height), at a uniformly
    random integer position. Objects appear as large as in a crop of that scale; unlike a crop, the
    aspect ratio is never distorted, and unlike the original view, it does not hold the whole image.
    """
    frac = scale[0] + (scale[1] - scale[0]) * _rand((n,), generator, device)
    side = frac.sqrt()
    w = (side * width).round().clamp(1, width)
    h = (side * height).round().clamp(1, height)
    u = _rand((n, 2), generator, device)
    x0 = torch.minimum(torch.floor(u[:, 0] * (width - w + 1)), width - w)
    y0 = torch.minimum(torch.floor(u[:, 1] * (height - h + 1)), height - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


@dataclass(frozen=True)
class ViewParams:
    """Per-sample random choices for n views (everything but the crop box)."""

    flip: Tensor  # (n,) bool: horizontal flip
    jitter: Tensor  # (n,) bool: colour jitter applied
    factors: Tensor  # (n, 4) brightness, contrast, saturation factors, hue shift; neutral where not jittered
    order: Tensor  # (n, 4) long: a random permutation of the op ids, applied left to right
    grayscale: Tensor  # (n,) bool
    blur: Tensor  # (n,) bool
    sigma: Tensor  # (n,) blur sigma (drawn for every row, used where `blur`)

    def map(self, fn) -> "ViewParams":
        return ViewParams(**{k: fn(getattr(self, k)) for k in self.__dataclass_fields__})

    def pack(self, boxes: Tensor) -> Tensor:
        """`boxes` (n, 5) and every field as one (n, PACKED_COLUMNS) float32 tensor: what crosses to
        the device in a single copy (booleans as 0/1, the order's small ints exactly)."""
        flags = torch.stack([self.flip, self.jitter, self.grayscale, self.blur], dim=1)
        return torch.cat([boxes.float(), self.factors.float(), self.order.float(), flags.float(),
                          self.sigma.float()[:, None]], dim=1)

    @staticmethod
    def unpack(packed: Tensor) -> tuple[Tensor, "ViewParams"]:
        """The inverse of `pack`: (boxes, params), as slices and casts of `packed` on its device."""
        boxes, factors, order = packed[:, 0:5], packed[:, 5:9], packed[:, 9:13].long()
        flip, jitter, gray, blur = (packed[:, 13:17] > 0.5).unbind(1)
        return boxes, ViewParams(flip, jitter, factors, order, gray, blur, packed[:, 17])

    @staticmethod
    def cat(parts: Sequence["ViewParams"]) -> "ViewParams":
        names = ViewParams.__dataclass_fields__
        return ViewParams(**{k: torch.cat([getattr(p, k) for p in parts]) for k in names})


def jitter_ranges(aug: AugmentSpec) -> list[tuple[float, float]]:
    """Low/high of each factor, as ColorJitter: [max(0, 1-b), 1+b] for brightness, contrast,
    saturation, and [-hue, hue] for the hue shift."""
    blends = [(max(0.0, 1 - v), 1 + v) for v in (aug.brightness, aug.contrast, aug.saturation)]
    return blends + [(-aug.hue, aug.hue)]


def sample_view_params(n: int, aug: AugmentSpec, generator=None, device=None, *,
                       photometric: bool = True, flip: bool = True) -> ViewParams:
    """Draw flip (flip_p), jitter (with probability jitter_p, factors uniform in their ranges, ops in a
    random order as torchvision's ColorJitter), grayscale (grayscale_p, independent of jitter) and blur
    (blur_p, sigma ~ U(blur_sigma)) for n views. `photometric` / `flip` False switch those off (the
    LeOCLR original view's options)."""
    on = 1.0 if photometric else 0.0
    flips = sample_mask(n, aug.flip_p if flip else 0.0, generator, device)
    jitter = sample_mask(n, aug.jitter_p * on, generator, device)
    u = _rand((n, 4), generator, device)
    neutral = (1.0, 1.0, 1.0, 0.0)
    factors = torch.stack([torch.where(jitter, lo + (hi - lo) * u[:, i], neutral[i])
                           for i, (lo, hi) in enumerate(jitter_ranges(aug))], dim=1)
    order = _rand((n, 4), generator, device).argsort(dim=1)
    grayscale = sample_mask(n, aug.grayscale_p * on, generator, device)
    blur = sample_mask(n, aug.blur_p * on, generator, device)
    lo, hi = aug.blur_sigma
    sigma = lo + (hi - lo) * _rand((n,), generator, device)
    return ViewParams(flips, jitter, factors, order, grayscale, blur, sigma)


# ---------------------------------------------------------------- batched image ops (float in [0, 1])
def _col(v: Tensor) -> Tensor:
    """A per-sample value shaped to broadcast over (n, C, H, W)."""
    return v.reshape(-1, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma."""
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]: the form of brightness, contrast, saturation.

    One fused `lerp` (which returns x exactly where factor is 1) rather than four elementwise passes.
    """
    return torch.lerp(other.expand_as(x), x, _col(factor).to(x.dtype)).clamp_(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate each sample's HSV hue by `shift` turns (in [-0.5, 0.5]), keeping value and chroma.

    Hue h is measured in sextants (0..6) from the max channel; the way back uses the piecewise-linear
    pure hue: R = clamp(|h-3| - 1), G = clamp(2 - |h-2|), B = clamp(2 - |h-4|), scaled by chroma c
    and lifted by the min channel.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v = x.amax(dim=1, keepdim=True)
    c = v - x.amin(dim=1, keepdim=True)
    # (h - sextant start) * c for the max channel; at ties the candidate formulas agree.
    rise = torch.where(r == v, g - b, torch.where(g == v, b - r + 2 * c, r - g + 4 * c))
    # Grey pixels (c = 0) have rise 0, so any positive divisor works there (tiny: no fp16 underflow).
    h = rise.div_(c.clamp_min(torch.finfo(c.dtype).tiny))
    h = h.add_(6 * shift.reshape(-1, 1, 1, 1).to(x.dtype)).remainder_(6)
    red, green, blue = (h - 3).abs_().sub_(1), (h - 2).abs_().neg_().add_(2), (h - 4).abs_().neg_().add_(2)
    pure = torch.cat([red, green, blue], dim=1)
    return torch.addcmul(v - c, c, pure.clamp_(0, 1))


def _blend_stage(x: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """Per sample, brightness, contrast or saturation (`op`): each blends x toward a degenerate image
    (black, its mean grey, its greyscale) with the sample's factor. Factor 1 leaves x exactly as is."""
    gray = grayscale(x)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    op = _col(op)
    target = torch.where(op == CONTRAST, mean, torch.where(op == SATURATION, gray, torch.zeros_like(mean)))
    return blend(x, target, factor)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor, with_hue: bool = True) -> Tensor:
    """Apply brightness, contrast, saturation and hue in each sample's own `order`.

    Instead of evaluating all four ops at each of four positions, the hue shift (the costly op) is run
    once: every sample's three blend ops go into three slots before it and three after it, each sample
    using the slots its order asks for and passing through the others with factor 1.
    """
    is_hue = (order == HUE).to(torch.uint8)
    hue_pos = is_hue.argmax(dim=1)
    blends = order.gather(1, torch.argsort(is_hue, dim=1, stable=True))[:, :3]
    blend_factors = factors.gather(1, blends)
    for before in (True, False):
        for t in range(3):
            use = hue_pos > t if before else hue_pos <= t
            x = _blend_stage(x, blends[:, t], torch.where(use, blend_factors[:, t], 1.0))
        if before and with_hue:
            x = torch.where(_col(factors[:, HUE] != 0), adjust_hue(x, factors[:, HUE]), x)
    return x


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """(n, kernel_size) normalised 1-D Gaussian taps, one row per sigma."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    w = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    # Taps under 1e-8 of the centre one change no float32 result but can be denormal, which makes
    # CPU convolution several times slower: drop them.
    w = torch.where(w < 1e-8, torch.zeros_like(w), w)
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int, apply: Tensor | None = None) -> Tensor:
    """Per-sample separable Gaussian blur with reflect padding (as torchvision's gaussian_blur).

    Rows with `apply` False get a unit-impulse kernel, which reproduces them exactly.
    """
    n, c, h, w = x.shape
    kernels = gaussian_kernels(sigma.float(), kernel_size)
    if apply is not None:
        impulse = (torch.arange(kernel_size, device=x.device) == kernel_size // 2).float()
        kernels = torch.where(apply[:, None], kernels, impulse)
    kernels = kernels.to(x.dtype).repeat_interleave(c, dim=0)  # one per channel: a depthwise conv
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    if y.device.type == "cpu" and y.numel() * kernel_size < _CPU_SMALL_CONV:
        # A single small image: oneDNN's per-call setup (~0.1 ms) would dominate; sum shifted copies.
        taps = kernels.T.reshape(kernel_size, 1, n * c, 1, 1)
        rows = y[..., 0:w] * taps[0]
        for i in range(1, kernel_size):
            rows = rows.addcmul(y[..., i:i + w], taps[i])
        y = rows[..., 0:h, :] * taps[0]
        for i in range(1, kernel_size):
            y = y.addcmul(rows[..., i:i + h, :], taps[i])
    else:
        y = F.conv2d(y, kernels.reshape(n * c, 1, 1, kernel_size), groups=n * c)
        y = F.conv2d(y, kernels.reshape(n * c, 1, kernel_size, 1), groups=n * c)
    return y.reshape(n, c, h, w)


def reflect_index(length: int, kernel_size: int, device=None) -> Tensor:
    """(length, kernel_size) source index of each tap of a centred kernel under reflect padding
    (the edge sample is not repeated, as `F.pad(mode="reflect")`)."""
    pad = kernel_size // 2
    if pad >= length:
        raise ValueError(f"a blur kernel of {kernel_size} taps needs views of more than {pad} px")
    i = torch.arange(length, device=device)[:, None] + torch.arange(kernel_size, device=device) - pad
    i = torch.where(i < 0, -i, i)
    return torch.where(i >= length, 2 * (length - 1) - i, i)


def blur_matrices(kernels: Tensor, length: int) -> Tensor:
    """(n, length, length) matrices M with (M @ v) = v blurred by each row of `kernels`, reflect-padded.

    Row i of M holds the taps at the reflected source positions of output i (taps that land on the
    same source, near an edge, add up).
    """
    n, k = kernels.shape
    idx = reflect_index(length, k, kernels.device).expand(n, length, k)
    m = torch.zeros(n, length, length, device=kernels.device, dtype=kernels.dtype)
    return m.scatter_add_(2, idx, kernels[:, None, :].expand(n, length, k))


def gaussian_blur_matmul(x: Tensor, sigma: Tensor, kernel_size: int, apply: Tensor | None = None) -> Tensor:
    """The same blur as `gaussian_blur`, as two batched matrix products per view.

    Why: a separable blur with per-sample kernels is a depthwise convolution with one group per
    channel of every view, a shape convolution libraries handle poorly at GPU batch sizes; as
    banded matrices (reflect padding folded in) it becomes two `bmm`s, the best-served op there is.
    Rows with `apply` False get identity matrices.
    """
    n, c, h, w = x.shape
    kernels = gaussian_kernels(sigma.float(), kernel_size)  # taps in float32 whatever x's dtype
    if apply is not None:
        impulse = (torch.arange(kernel_size, device=x.device) == kernel_size // 2).float()
        kernels = torch.where(apply[:, None], kernels, impulse)
    kernels = kernels.to(x.dtype)
    rows = blur_matrices(kernels, w)  # along each row: x @ M_w^T
    y = torch.bmm(x.reshape(n, c * h, w), rows.transpose(1, 2))
    cols = blur_matrices(kernels, h) if h != w else rows  # along each column: M_h @ x
    y = y.view(n, c, h, w).transpose(1, 2).reshape(n, h, c * w)
    return torch.bmm(cols, y).view(n, h, c, w).transpose(1, 2).contiguous()


BLUR_IMPLS = ("auto", "conv", "matmul")


# ---------------------------------------------------------------- the views
class BatchedViews:
    """Make views of a uint8 (B, 3, H, W) batch (or float in [0, 1]) on its own device.

    `kinds` names each view: "original" (X, the whole image square-resized), "crop" (a random
    resized crop) or "window" (`sample_window_boxes`: a control that puts the whole image at a
    crop's scale); "original" and "window" take the spec's original_* options. Returns one
    normalised (B, 3, size, size) tensor per kind, of `dtype`. Pass a CPU `torch.Generator` for
    reproducible views (the same on every device: see `params_for`).

    `dtype` float16 runs everything after the resampling (which stays float32: sample positions
    need its precision) in half precision: half the memory traffic of these memory-bound ops, for
    errors of the order of the bfloat16 rounding a bf16 model applies to its input anyway (tested:
    under 4/255, 0.2/255 on average; float16 is meant for accelerators, on a CPU it is slow).
    `blur`: "conv" (grouped convolution), "matmul" (banded matrices, see
    `gaussian_blur_matmul`) or "auto" (matmul on accelerators, conv on the CPU).
    """

    def __init__(self, aug: AugmentSpec, size: int, mean: Sequence[float], std: Sequence[float],
                 kinds: Sequence[str] = ("original", "crop", "crop"), *, blur: str = "auto",
                 compile: bool = False, dtype: torch.dtype = torch.float32):
        mean, std = check_view_args(size, mean, std)
        kinds = tuple(kinds)
        if not kinds or any(k not in VIEW_KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty sequence of {VIEW_KINDS}, got {list(kinds)}")
        if blur not in BLUR_IMPLS:
            raise ValueError(f"blur must be one of {BLUR_IMPLS}, got {blur!r}")
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
        self.aug, self.size, self.kinds, self.blur, self.dtype = aug, size, kinds, blur, dtype
        # Compiled, the photometric chain (dozens of elementwise passes) fuses into a few kernels;
        # shapes are fixed per run, so dynamic shapes would only slow the kernels down.
        self._compiled = torch.compile(self._views, dynamic=False) if compile else None
        self.kernel_size = blur_kernel_size(size)
        # Per kind: (photometric, flip) switches; the original view's come from the spec.
        self._switches = [(True, True) if k == "crop" else (aug.original_photometric, aug.original_flip)
                          for k in kinds]
        photometric, flip = any(p for p, _ in self._switches), any(f for _, f in self._switches)
        self._do_jitter = photometric and aug.jitter_p > 0 and bool(
            aug.brightness or aug.contrast or aug.saturation or aug.hue)
        self._do_gray = photometric and aug.grayscale_p > 0
        self._do_blur = photometric and aug.blur_p > 0
        self._do_flip = flip and aug.flip_p > 0
        self._norm_cpu = torch.tensor(mean).view(1, 3, 1, 1), 1 / torch.tensor(std).view(1, 3, 1, 1)
        self._norm: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _normaliser(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """mean and 1/std on `device`, copied there once (a copy per call would synchronise a GPU)."""
        if device not in self._norm:
            self._norm[device] = tuple(t.to(device, self.dtype) for t in self._norm_cpu)
        return self._norm[device]

    def _boxes(self, b: int, h: int, w: int, generator, device) -> Tensor:
        """(K, 5) roi_align boxes (batch index, x0, y0, x1, y1); row k*b+i is view k of image i."""
        rows = []
        for kind in self.kinds:
            if kind == "crop":
                aug = self.aug
                rows.append(sample_crop_boxes(b, h, w, aug.crop_scale, aug.crop_ratio, generator, device))
            else:  # the whole image, built on the device (no host-to-device copy); a window's box
                # replaces it in `sample`, after every other draw
                zero = torch.zeros(b, device=device)
                rows.append(torch.stack([zero, zero, zero + w, zero + h], dim=1))
        index = torch.arange(b, device=device, dtype=torch.float32).repeat(len(self.kinds))
        return torch.cat([index[:, None], torch.cat(rows)], dim=1)

    def sample(self, b: int, h: int, w: int, generator: torch.Generator | None, device) -> tuple[Tensor, ViewParams]:
        """Every random choice for the views of b images of h x w: roi_align boxes and the rest."""
        boxes = self._boxes(b, h, w, generator, device)
        params = ViewParams.cat([sample_view_params(b, self.aug, generator, device, photometric=p, flip=f)
                                 for p, f in self._switches])
        # Windows are drawn last, so that with one generator every other view (box and parameters)
        # is exactly what the same kinds with "original" in place of "window" give: the control
        # changes that view's geometry and nothing else.
        for k, kind in enumerate(self.kinds):
            if kind == "window":
                boxes[k * b:(k + 1) * b, 1:] = sample_window_boxes(b, h, w, self.aug.crop_scale, generator, device)
        return boxes, params

    def params_for(self, b: int, h: int, w: int, generator: torch.Generator | None,
                   device: torch.device) -> tuple[Tensor, ViewParams]:
        """`sample` on the generator's device (the CPU when there is none: the global CPU generator),
        then on `device`: sampled elsewhere, every parameter crosses in one packed copy.

        Why the CPU: drawing a batch's parameters is some forty ops on tensors of a few hundred
        numbers; on a GPU each is a kernel launch (2.8-3.2 ms a batch on an H200, longer than the
        crops, and on the device's queue). Drawn on the CPU it took 2.0 ms there, copy included,
        and keeps the device's queue free: the one small copy is done by the copy engine beside
        the training kernels. It also makes a seeded generator give the same views on every
        device.
        """
        pdev = generator.device if generator is not None else torch.device("cpu")
        boxes, params = self.sample(b, h, w, generator, pdev)
        if pdev == device:
            return boxes, params
        packed = params.pack(boxes)
        if device.type == "cuda" and packed.device.type == "cpu":
            packed = packed.pin_memory()  # a real async copy; the pinned block is not reused before it ends
        return ViewParams.unpack(packed.to(device, non_blocking=True))

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
        """One (B, 3, size, size) tensor per kind. Nothing here waits on the device. Parameters are
        drawn by `generator` on its device (pass a seeded CPU one for reproducible views), or by the
        global CPU generator, and reach the images' device in one copy (`params_for`)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(images.shape)}")
        b, _, h, w = images.shape
        dev = images.device
        boxes, params = self.params_for(b, h, w, generator, dev)
        source = images.float()
        if images.dtype == torch.uint8:
            source = source.mul_(1 / 255)
        n, s = len(boxes), self.size
        # On the CPU, work through views in cache-sized chunks (the ops are memory-bound); a GPU takes all.
        step = n if dev.type != "cpu" else max(1, _CPU_CHUNK_FLOATS // (3 * s * s))
        norm = self._normaliser(dev)
        if self._compiled is not None:  # whole batch: compiled, the passes are fused anyway
            x = self._compiled(source, boxes, params, norm)
        elif step >= n:
            x = self._views(source, boxes, params, norm)
        else:
            x = torch.empty(n, 3, s, s, device=dev, dtype=self.dtype)
            for i in range(0, n, step):
                part = params.map(lambda t: t[i:i + step])
                x[i:i + step] = self._views(source, boxes[i:i + step], part, norm)
        return tuple(x.view(len(self.kinds), b, 3, s, s).unbind(0))

    def _views(self, source: Tensor, boxes: Tensor, p: ViewParams, norm: tuple[Tensor, Tensor]) -> Tensor:
        """Resample `boxes` of the float [0, 1] `source` to views and augment them."""
        x = roi_align(source, boxes, (self.size, self.size), 1.0, -1, True).clamp_(0, 1).to(self.dtype)
        if self._do_flip:
            x = torch.where(_col(p.flip), x.flip(-1), x)
        if self._do_jitter:
            x = color_jitter(x, p.factors, p.order, with_hue=self.aug.hue > 0)  # neutral factors: no-op
        if self._do_gray:
            x = torch.where(_col(p.grayscale), grayscale(x).expand_as(x), x)
        if self._do_blur:
            matmul = self.blur == "matmul" or (self.blur == "auto" and x.device.type != "cpu")
            x = (gaussian_blur_matmul if matmul else gaussian_blur)(x, p.sigma, self.kernel_size, p.blur)
        mean, inv_std = norm
        return (x - mean).mul_(inv_std)
