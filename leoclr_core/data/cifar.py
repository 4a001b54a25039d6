"""CIFAR-10 read straight from torchvision's on-disk format, with no download and no md5 check.

The md5 check is skipped on purpose: it hashes 170 MB at every start-up and rejects re-packed
copies that are byte-different but correct. The files are Python pickles, so only point this at a
copy you trust (unpickling runs code), as with torchvision itself.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leoclr_core.data.base import InMemorySource, check_resize, check_split

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
DEFAULT_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def find_cifar_folder(path: str | Path) -> Path:
    """Accept either the folder holding `cifar-10-batches-py` or that folder itself."""
    root = Path(path).expanduser()
    for candidate in (root / FOLDER, root):
        if (candidate / "test_batch").is_file() or (candidate / TRAIN_BATCHES[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 data under '{root}': expected '{root / FOLDER}/data_batch_1..5' and 'test_batch' "
        "(the torchvision python format; download it once with torchvision.datasets.CIFAR10(download=True))"
    )


def _unpickle(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as f:
            raw = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise FileNotFoundError(f"CIFAR-10 batch file missing: '{file}'") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"'{file}' is not a readable CIFAR-10 batch: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"'{file}' is not a CIFAR-10 batch (a pickled dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _read_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(file)
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"'{file}' lacks the 'data' and 'labels' entries of a CIFAR-10 batch")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"'{file}': expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major: already CHW.
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(folder: Path) -> list[str]:
    meta = folder / "batches.meta"
    if not meta.is_file():
        return list(DEFAULT_CLASSES)
    names = _unpickle(meta).get("label_names")
    if not names:
        return list(DEFAULT_CLASSES)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


class Cifar10(InMemorySource):
    """CIFAR-10 train (data_batch_1..5) or test (test_batch) split, held in memory as (N, 3, 32, 32)."""

    name = "cifar10"

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        num_images: int | None = None,
        *,
        labelled: bool = True,
        resize_to: int | None = None,
    ) -> None:
        super().__init__()
        if num_images is not None and num_images < 1:
            raise ValueError(f"num_images must be a positive int or None (all), got {num_images!r}")
        self.split = check_split(split)
        self.folder = find_cifar_folder(path)
        self.labelled = bool(labelled)
        self.resize_to = check_resize(resize_to)
        self.fixed_size = self.resize_to or 32
        chunks: list[tuple[np.ndarray, np.ndarray]] = []
        have = 0
        for name in TRAIN_BATCHES if split == "train" else TEST_BATCHES:
            if num_images is not None and have >= num_images:
                break  # the cap is "the first N": later batches need not be read at all
            chunks.append(_read_batch(self.folder / name))
            have += len(chunks[-1][1])
        data = np.concatenate([c[0] for c in chunks])[:num_images]
        labels = np.concatenate([c[1] for c in chunks])[:num_images]
        if len(data) == 0:
            raise ValueError(f"the CIFAR-10 {split} split in '{self.folder}' holds no images")
        self.class_names = _class_names(self.folder)
        if labels.min() < 0 or labels.max() >= len(self.class_names):
            raise ValueError(f"'{self.folder}': labels outside [0, {len(self.class_names)})")
        self.classes = self.class_names if self.labelled else None
        self.data, self.labels = data, labels

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.data[index].copy()), int(self.labels[index])
