"""Per-sample LeOCLR / MoCo-v2 views on the CPU with torchvision.transforms.v2 (DataLoader workers).

LeOCLR makes three views per image: X, the whole image square-resized (no crop, so it keeps every
object the crops might cut away), and two random resized crops X1, X2; MoCo-v2 needs only the crops.
Every view comes from one builder, `_view_pipeline`: the views differ only in crop vs resize and in
whether X gets photometric ops and flips. For speed on small images the geometry runs on uint8, the
image becomes float once, at view size, and the blur runs on that small output. `augment.py` is the
batched twin (same distributions) for the training device.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from leoclr_core.views.batched import VIEW_KINDS, blur_kernel_size, check_view_args, gaussian_blur
from leoclr_core.spec.models import METHOD_VIEWS, AugmentSpec


class RandomGaussianBlur:
    """`RandomApply([v2.GaussianBlur(k, sigma)], p)` with the same draws, but separable.

    torchvision convolves with the full k x k kernel (23 x 23 at 224 px); two 1-D passes give the same
    image several times faster. Shares `augment.gaussian_blur` with the batched path.
    """

    def __init__(self, kernel_size: int, sigma: tuple[float, float], p: float):
        self.kernel_size, self.sigma, self.p = kernel_size, sigma, p

    def __call__(self, image: Tensor) -> Tensor:
        if torch.rand(1).item() >= self.p:
            return image
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1])
        return gaussian_blur(image[None], sigma, self.kernel_size)[0]


class RandomWindow:
    """The "window" view (`batched.sample_window_boxes`, per sample): the whole image resized at a
    crop's scale (area fraction a ~ U(scale)), a size x size window cut from it at a random place."""

    def __init__(self, size: int, scale: tuple[float, float]):
        self.size, self.scale = size, scale

    def __call__(self, image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        a = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(1).item()
        bw, bh = (min(w, max(1, round(a ** 0.5 * w))), min(h, max(1, round(a ** 0.5 * h))))
        x0 = int(torch.randint(0, w - bw + 1, (1,)).item())
        y0 = int(torch.randint(0, h - bh + 1, (1,)).item())
        return TF.resized_crop(image, y0, x0, bh, bw, [self.size, self.size], antialias=True)


def _view_pipeline(aug: AugmentSpec, size: int, mean: tuple, std: tuple, *, crop: bool | str,
                   photometric: bool, flip: bool) -> v2.Compose:
    """One view: crop (or square resize, or window) -> flip -> float -> jitter, grayscale, blur -> normalise.

    `crop`: True a random resized crop, False the square resize of the whole image, "window" a
    `RandomWindow`. Steps whose probability or strength is zero are left out, so they cost nothing.
    """
    if crop == "window":
        steps: list[Any] = [RandomWindow(size, aug.crop_scale)]
    elif crop:
        steps = [v2.RandomResizedCrop(size, aug.crop_scale, aug.crop_ratio, antialias=True)]
    else:
        steps = [v2.Resize((size, size), antialias=True)]
    if flip and aug.flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(aug.flip_p))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if photometric:
        if aug.jitter_p > 0 and (aug.brightness or aug.contrast or aug.saturation or aug.hue):
            jitter = v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)
            steps.append(v2.RandomApply([jitter], p=aug.jitter_p))
        if aug.grayscale_p > 0:
            steps.append(v2.RandomGrayscale(aug.grayscale_p))
        if aug.blur_p > 0:
            steps.append(RandomGaussianBlur(blur_kernel_size(size), aug.blur_sigma, aug.blur_p))
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def _as_uint8_tensor(image: Any) -> Tensor:
    """A (3, H, W) tensor from a tensor or PIL image; greyscale inputs are repeated to RGB."""
    if not isinstance(image, Tensor):
        if hasattr(image, "convert") and getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")  # PIL: palette, L, RGBA, ... -> RGB
        image = TF.to_image(image)
    image = image.as_subclass(Tensor)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    return image


def _plain(t: Tensor) -> Tensor:
    return t.as_subclass(Tensor)


class TripleViewTransform:
    """LeOCLR: image -> (X, X1, X2), each a normalised float32 (3, size, size) tensor."""

    def __init__(self, aug: AugmentSpec, size: int, mean: Sequence[float], std: Sequence[float]):
        mean, std = check_view_args(size, mean, std)
        self.original = _view_pipeline(aug, size, mean, std, crop=False,
                                       photometric=aug.original_photometric, flip=aug.original_flip)
        self.crop = _view_pipeline(aug, size, mean, std, crop=True, photometric=True, flip=True)

    def __call__(self, image: Any) -> tuple[Tensor, Tensor, Tensor]:
        image = _as_uint8_tensor(image)
        return _plain(self.original(image)), _plain(self.crop(image)), _plain(self.crop(image))


class TwoViewTransform:
    """MoCo-v2: image -> (X1, X2), two independently augmented random resized crops."""

    def __init__(self, aug: AugmentSpec, size: int, mean: Sequence[float], std: Sequence[float]):
        mean, std = check_view_args(size, mean, std)
        self.crop = _view_pipeline(aug, size, mean, std, crop=True, photometric=True, flip=True)

    def __call__(self, image: Any) -> tuple[Tensor, Tensor]:
        image = _as_uint8_tensor(image)
        return _plain(self.crop(image)), _plain(self.crop(image))


class KindsViewTransform:
    """Any sequence of view kinds (`batched.VIEW_KINDS`): image -> one view per kind. Crops take the
    crop recipe; "original" and "window" views take the original_* options (`augment.views`)."""

    def __init__(self, aug: AugmentSpec, size: int, mean: Sequence[float], std: Sequence[float],
                 kinds: Sequence[str]):
        mean, std = check_view_args(size, mean, std)
        if not kinds or any(k not in VIEW_KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty sequence of {VIEW_KINDS}, got {list(kinds)}")
        self.kinds = tuple(kinds)
        geometry = {"original": False, "crop": True, "window": "window"}
        self.pipelines = [
            _view_pipeline(aug, size, mean, std, crop=geometry[k], photometric=k == "crop" or aug.original_photometric,
                           flip=k == "crop" or aug.original_flip)
            for k in self.kinds
        ]

    def __call__(self, image: Any) -> tuple[Tensor, ...]:
        image = _as_uint8_tensor(image)
        return tuple(_plain(p(image)) for p in self.pipelines)


def make_view_transform(method: str, aug: AugmentSpec, size: int, mean: Sequence[float], std: Sequence[float],
                        kinds: Sequence[str] | None = None) -> TripleViewTransform | TwoViewTransform | KindsViewTransform:
    """The training transform of a method: three views for "leoclr", two crops for "mocov2"; with
    `kinds` other than the method's own (`augment.views`), one view of each of those kinds."""
    if method not in METHOD_VIEWS:
        raise ValueError(f"unknown method {method!r}; expected 'leoclr' or 'mocov2'")
    if kinds is not None and tuple(kinds) != METHOD_VIEWS[method]:
        return KindsViewTransform(aug, size, mean, std, kinds)
    if method == "leoclr":
        return TripleViewTransform(aug, size, mean, std)
    if method == "mocov2":
        return TwoViewTransform(aug, size, mean, std)
    raise ValueError(f"unknown method {method!r}; expected 'leoclr' or 'mocov2'")
