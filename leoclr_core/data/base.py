"""The contract every image source honours, so the training loop never special-cases a dataset.

A sample is `(image, label, skipped)`: a uint8 (3, H, W) RGB tensor, an int label (-1 when the
source is unlabelled) and how many corrupt files were passed over to produce it. One bad file in a
million-image folder must not kill a multi-hour run, so a corrupt file is skipped (the next index is
tried, wrapping round), counted, and logged once; only a source where *every* file is bad is an error.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

log = logging.getLogger("leoclr_core.data")

SPLITS = ("train", "test")


class CorruptImageError(Exception):
    """Raised by `ImageSource._load` for a file that cannot be decoded; never escapes `__getitem__`."""


class AllImagesCorruptError(RuntimeError):
    """Every image of a source failed to decode: there is nothing to train on."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return split


def check_resize(resize_to: int | None) -> int | None:
    if resize_to is not None and not (isinstance(resize_to, int) and 1 <= resize_to <= 4096):
        raise ValueError(f"resize_to must be None or an int in [1, 4096], got {resize_to!r}")
    return resize_to


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased square resize of a uint8 (3, H, W) tensor, or of a (N, 3, H, W) batch of them;
    aspect ratio is not kept (so batches stack)."""
    if image.shape[-2:] == (size, size):
        return image
    batch = image if image.ndim == 4 else image[None]
    out = F.interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out if image.ndim == 4 else out[0]


class ImageSource(Dataset):
    """Base class: subclasses implement `__len__`, `_load(i)` and fill the attributes below.

    Attributes:
        name: the registry name of the source ("synthetic-objects", ...).
        split: "train" or "test".
        labelled: False when labels are unknown (or ignored); `__getitem__` then returns -1.
        classes: class names, index = label (None when unlabelled).
        num_classes: len(classes) or None.
        fixed_size: every image is fixed_size x fixed_size when not None, so batches stack.
        resize_to: when set, every returned image is square-resized to it (it also sets fixed_size).
    """

    name: str = "source"
    split: str = "train"
    labelled: bool = True
    classes: list[str] | None = None
    fixed_size: int | None = None
    resize_to: int | None = None

    def __init__(self) -> None:
        self._bad: set[int] = set()  # indices already reported, so each bad file is logged once

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if (self.labelled and self.classes is not None) else None

    @property
    def targets(self) -> np.ndarray:
        """All labels as int64 (N,) without decoding any image (-1 everywhere when unlabelled)."""
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load(self, index: int) -> tuple[torch.Tensor, int]:  # pragma: no cover - abstract
        """Return (uint8 (3, H, W) tensor, label) or raise CorruptImageError."""
        raise NotImplementedError

    def describe_item(self, index: int) -> str:
        """How a log line names item `index` (a file path for file sources)."""
        return f"{self.name}[{index}]"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} {self.split} split of {n} images")
        index %= n
        skipped = 0
        for attempt in range(n):
            j = (index + attempt) % n
            try:
                image, label = self._load(j)
            except CorruptImageError as exc:
                skipped += 1
                if j not in self._bad:
                    self._bad.add(j)
                    log.warning("skipping corrupt image %s: %s", self.describe_item(j), exc)
                continue
            if self.resize_to is not None and image.ndim == 3:  # 1-D: still-encoded bytes (encoded mode)
                image = resize_square(image, self.resize_to)
            return image, (int(label) if self.labelled else -1), skipped
        raise AllImagesCorruptError(
            f"all {n} images of the {self.name} {self.split} split are corrupt or unreadable "
            f"(e.g. {self.describe_item(index)}); see the warnings logged by 'leoclr_core.data'"
        )

    def __repr__(self) -> str:
        size = f"{self.fixed_size}px" if self.fixed_size else "variable size"
        classes = f"{self.num_classes} classes" if self.num_classes else "unlabelled"
        return f"<{type(self).__name__} {self.name} {self.split}: {len(self)} images, {size}, {classes}>"


class InMemorySource(ImageSource):
    """A source whose labels (and images) are already arrays in memory: `labels` (N,) int64."""

    labels: np.ndarray

    @property
    def targets(self) -> np.ndarray:
        return self.labels.copy() if self.labelled else np.full(len(self), -1, np.int64)

    def __len__(self) -> int:
        return len(self.labels)


def as_hwc_array(source: ImageSource) -> np.ndarray:
    """All images of a fixed-size source as one uint8 (N, H, W, 3) array (for Ray Data's
    `from_numpy`); synthetic scenes are already held that way."""
    held = getattr(source, "images", None)
    if isinstance(held, np.ndarray) and held.ndim == 4 and held.shape[-1] == 3 and source.resize_to is None:
        return held
    if source.fixed_size is None:
        raise ValueError(f"{source!r} has images of different sizes; build it with resize_to=<size>")
    return np.stack([source[i][0].permute(1, 2, 0).numpy() for i in range(len(source))])


def collate_images(batch: Sequence[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack samples to (uint8 (B, 3, H, W), int64 labels (B,), total skipped corrupt files)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    images, labels, skipped = zip(*batch)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"images of different sizes {sorted(shapes)[:3]} cannot be stacked; "
            "build the source with resize_to=<size>"
        )
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), int(sum(skipped))
