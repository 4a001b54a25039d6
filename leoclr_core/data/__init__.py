"""Image sources: one registry entry per `data.source`, all honouring the `ImageSource` contract.

This package may import torch, torchvision, numpy and PIL only (never ray, mlflow or fastapi), so
the training core can run anywhere.
"""

from __future__ import annotations

from typing import Callable, Literal

from leoclr_core.data.base import (
    AllImagesCorruptError,
    CorruptImageError,
    ImageSource,
    as_hwc_array,
    check_split,
    collate_images,
    resize_square,
)
from leoclr_core.data.cifar import Cifar10
from leoclr_core.data.imagefolder import ImageFolder
from leoclr_core.data.parquet import ParquetImages
from leoclr_core.data.synthetic import CLASS_NAMES, SceneMeta, SyntheticObjects
from leoclr_core.spec.models import DATA_SOURCES, DataSpec

Split = Literal["train", "test"]


def _count(data: DataSpec, split: str) -> int | None:
    return data.num_images if split == "train" else data.num_test_images


def _synthetic(data: DataSpec, split: str, resize_to: int | None) -> ImageSource:
    n = _count(data, split)
    if not n:
        raise ValueError(f"the synthetic-objects {split} split is empty: data.num_test_images is 0")
    return SyntheticObjects(n, data.seed, split, data.synthetic, labelled=data.labelled, resize_to=resize_to)


def _cifar10(data: DataSpec, split: str, resize_to: int | None) -> ImageSource:
    n = _count(data, split)
    if n == 0:
        raise ValueError("the cifar10 test split is empty: data.num_test_images is 0")
    return Cifar10(data.path, split, n, labelled=data.labelled, resize_to=resize_to)


def _imagefolder(data: DataSpec, split: str, resize_to: int | None) -> ImageSource:
    return ImageFolder(
        data.path,
        split,
        labelled=data.labelled,
        num_images=data.num_images,
        num_test=data.num_test_images,
        seed=data.seed,
        resize_to=resize_to,
    )


def _parquet(data: DataSpec, split: str, resize_to: int | None) -> ImageSource:
    return ParquetImages(data.path, split, image_column=data.image_column,  # type: ignore[arg-type]
                         label_column=data.label_column, labelled=data.labelled,
                         num_images=_count(data, split), resize_to=resize_to)


SOURCES: dict[str, Callable[[DataSpec, str, int | None], ImageSource]] = {
    "synthetic-objects": _synthetic,
    "cifar10": _cifar10,
    "imagefolder": _imagefolder,
    "parquet": _parquet,
}
if set(SOURCES) != set(DATA_SOURCES):  # the spec's list of names and this registry must agree
    raise ImportError(f"data registry {sorted(SOURCES)} does not match spec.DATA_SOURCES {sorted(DATA_SOURCES)}")


def build_source(data: DataSpec, split: Split, resize_to: int | None = None) -> ImageSource:
    """The `split` of the source `data` describes.

    Train uses `data.num_images` (a cap for file sources, the count for synthetic), test uses
    `data.num_test_images`. `resize_to` square-resizes every image (needed to batch an image
    folder of mixed sizes); fixed-size sources keep their size when it is None.
    """
    check_split(split)
    try:
        builder = SOURCES[data.source]
    except KeyError:
        raise ValueError(f"unknown data source {data.source!r}; known: {sorted(SOURCES)}") from None
    return builder(data, split, resize_to)


__all__ = [
    "AllImagesCorruptError",
    "CLASS_NAMES",
    "Cifar10",
    "CorruptImageError",
    "ImageFolder",
    "ImageSource",
    "ParquetImages",
    "as_hwc_array",
    "SOURCES",
    "SceneMeta",
    "Split",
    "SyntheticObjects",
    "build_source",
    "collate_images",
    "resize_square",
]
