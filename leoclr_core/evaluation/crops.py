"""Evaluation on crops: k-NN where both the memory bank and the queries are random resized crops.

The standard protocols (`probes`) evaluate the whole image, square-resized: the very view LeOCLR's
query encoder is trained on, and one MoCo-v2's never sees. Evaluating on crops as well tells a
representation that is better from one that is only better matched to the evaluation view. The
crops are a fixed set: each image gets one crop, its box drawn once from a seed (RandomResizedCrop's
distribution, `views.batched.sample_crop_boxes`), so two encoders evaluated with one seed see the
same crops, and one encoder evaluated twice gets the same accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from leoclr_core.evaluation.probes import accuracy, extract_features, knn_predict
from leoclr_core.training.engine import Runtime
from leoclr_core.views.batched import sample_crop_boxes

CROP_SCALE = (0.2, 1.0)  # MoCo-v2's crops (augment.crop_scale's default)
CROP_RATIO = (3 / 4, 4 / 3)


class FixedCrops(Dataset):
    """Each image of `source` as one random resized crop (uint8, size x size), the same crop on every
    read: (crop, label, skipped). Boxes are drawn once with `seed`, as fractions of the image, so
    images of any size get the crop drawn for their index."""

    def __init__(self, source: Dataset, size: int, *, scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO, seed: int = 0, resolution: int = 4096):
        self.source, self.size = source, size
        n = len(source)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(seed)
        # Drawn on a fine grid (`resolution` px a side) and kept as fractions of the image.
        boxes = sample_crop_boxes(n, resolution, resolution, scale, ratio, gen)
        self.fractions = boxes / resolution

    def __len__(self) -> int:
        return len(self.fractions)

    def box(self, i: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) in pixels of image i's crop, for an image of that size."""
        x0, y0, x1, y1 = (self.fractions[i] * torch.tensor([width, height, width, height])).tolist()
        left, top = min(int(round(x0)), width - 1), min(int(round(y0)), height - 1)
        return top, left, max(1, min(height - top, int(round(y1 - y0)))), max(1, min(width - left, int(round(x1 - x0))))

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        image, label, skipped = self.source[i]
        top, left, h, w = self.box(i, *image.shape[-2:])
        return TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True), label, skipped


def knn_on_crops(backbone: torch.nn.Module, train_set: Dataset, test_set: Dataset, runtime: Runtime, *,
                 num_classes: int, size: int, mean: tuple[float, ...], std: tuple[float, ...], k: int = 200,
                 temperature: float = 0.1, seed: int = 0, scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = CROP_RATIO, batch_size: int = 256) -> float:
    """k-NN top-1 (percent) with a bank of one fixed crop per training image and one fixed crop per
    test image as queries (seeds `seed` and `seed + 1`); features as `probes.extract_features`."""
    common = dict(size=size, mean=mean, std=std, batch_size=batch_size)
    bank = FixedCrops(train_set, size, scale=scale, ratio=ratio, seed=seed)
    queries = FixedCrops(test_set, size, scale=scale, ratio=ratio, seed=seed + 1)
    ftr, ytr = extract_features(backbone, bank, runtime, **common)
    fte, yte = extract_features(backbone, queries, runtime, **common)
    if (ytr < 0).any() or (yte < 0).any():
        raise ValueError("evaluation needs labelled images (the data source returned unlabelled ones)")
    return accuracy(knn_predict(ftr, ytr, fte, num_classes, k, temperature), yte)
