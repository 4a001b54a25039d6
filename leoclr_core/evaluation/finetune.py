"""The fine-tuning protocol: a copy of the backbone and a linear head trained end to end on a
class-balanced labelled subset of the train split, accuracy on the test split (the semi-supervised
evaluation of SimCLR and BYOL, with 1% or 10% of the labels).

Training sees random resized crops and flips of each image; the test split is resized whole and
normalised, the input the frozen protocols see (`probes.prepare_images`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2

from leoclr_core.data import ImageSource, collate_images
from leoclr_core.evaluation.probes import extract_features, prepare_images
from leoclr_core.spec.models import FinetuneSpec, check_label_fraction, labelled_per_class
from leoclr_core.training.engine import Runtime

log = logging.getLogger(__name__)

CROP_RATIO = (3 / 4, 4 / 3)  # the aspect ratios of the pretraining crops (augment.crop_ratio's default)


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced labelled subset: of each class of n images,
    `labelled_per_class(fraction, n)` drawn at random. Each class is drawn from its own stream of
    (seed, class), so its picks do not depend on the other classes, and with one seed a smaller
    fraction's subset lies inside a larger one's. A fraction that leaves a class less than one image
    is refused (ValueError naming eval.finetune.label_fraction)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"a labelled subset needs a non-empty list of labels, got shape {labels.shape}")
    if (labels < 0).any():
        raise ValueError("a labelled subset needs the label of every training image (some are unlabelled)")
    classes, counts = np.unique(labels, return_counts=True)
    smallest = int(np.argmin(counts))
    check_label_fraction(fraction, int(counts[smallest]), f"class {int(classes[smallest])}")
    picks = []
    for c, n in zip(classes.tolist(), counts.tolist()):
        members = np.flatnonzero(labels == c)
        order = np.random.default_rng([seed, c]).permutation(n)
        picks.append(members[order[: labelled_per_class(fraction, n)]])
    return np.sort(np.concatenate(picks))


class AugmentedSubset(Dataset):
    """Items `indices` of `source`, each a fresh random resized crop and flip (uint8, size x size)."""

    def __init__(self, source: Dataset, indices: np.ndarray, size: int, crop_scale: tuple[float, float]):
        self.source, self.indices = source, indices
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=crop_scale, ratio=CROP_RATIO, antialias=True),
            v2.RandomHorizontalFlip(),
        ])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label, skipped = self.source[int(self.indices[i])]
        return self.transform(image), label, skipped


@dataclass
class FinetuneResult:
    top1: float
    top5: float | None  # with at least 5 classes
    label_fraction: float
    labelled_images: int

    def as_metrics(self) -> dict[str, float]:
        out = {"finetune_top1": self.top1}
        if self.top5 is not None:
            out["finetune_top5"] = self.top5
        return out


def finetune(
    backbone: nn.Module,
    train_set: ImageSource,
    test_set: Dataset,
    runtime: Runtime,
    spec: FinetuneSpec,
    *,
    num_classes: int,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    subset_seed: int = 0,
    seed: int = 0,
    num_workers: int = 0,
) -> FinetuneResult:
    """Fine-tune a copy of `backbone` (`backbone` itself is left as it was) with a linear head on the
    labelled subset of `train_set` (drawn with `subset_seed`); top-1 and top-5 accuracy (percent) on
    `test_set`. `seed` draws the crops, flips and batch order: on a CPU, one seed gives one result."""
    indices = balanced_subset(train_set.targets, spec.label_fraction, subset_seed)
    # Forked: the crops (and the loaders' worker seeds) draw from torch's global generator, whose
    # stream the caller's own draws must not share.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        labelled = AugmentedSubset(train_set, indices, size, spec.crop_scale)
        model = _train(backbone, labelled, runtime, spec, num_classes=num_classes, size=size, mean=mean, std=std,
                       seed=seed, num_workers=num_workers)
        logits, labels = extract_features(model, test_set, runtime, size=size, mean=mean, std=std,
                                          batch_size=spec.batch_size, num_workers=num_workers)
    if labels.numel() == 0:
        raise ValueError("cannot compute an accuracy on zero test samples")
    if (labels < 0).any():
        raise ValueError("evaluation needs labelled images (the test split returned unlabelled ones)")
    hits = logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]
    top1 = 100.0 * hits[:, 0].float().mean().item()
    top5 = 100.0 * hits.any(dim=1).float().mean().item() if num_classes >= 5 else None
    return FinetuneResult(top1, top5, spec.label_fraction, len(indices))


def _train(backbone: nn.Module, labelled: AugmentedSubset, runtime: Runtime, spec: FinetuneSpec, *,
           num_classes: int, size: int, mean: tuple[float, ...], std: tuple[float, ...], seed: int,
           num_workers: int) -> nn.Module:
    net = copy.deepcopy(backbone).to(runtime.device).requires_grad_(True)
    with torch.no_grad():
        net.eval()  # a probe input must not move the batch-norm statistics
        dim = net(runtime.to_device(torch.zeros(2, 3, size, size, device=runtime.device))).shape[1]
    head = nn.Linear(dim, num_classes).to(runtime.device)
    # A zero head sends no gradient into the pretrained features until it has learnt something:
    # a random one would push them around with noise for the first steps.
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model = nn.Sequential(net, head)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    batch = min(spec.batch_size, len(labelled))
    # drop_last: a last batch of one image would break batch norm in train mode; the images it
    # leaves out differ every epoch.
    loader = DataLoader(labelled, batch_size=batch, drop_last=True, collate_fn=collate_images,
                        sampler=RandomSampler(labelled, generator=torch.Generator().manual_seed(seed)),
                        num_workers=num_workers, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed + 1))
    steps = spec.epochs * len(loader)
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    with torch.enable_grad():
        for epoch in range(spec.epochs):
            total = torch.zeros((), device=runtime.device)  # summed on the device: no sync per step
            for images, y, _ in loader:
                x = runtime.to_device(prepare_images(images.to(runtime.device), size, mean, std))
                y = y.to(runtime.device)
                with runtime.autocast():
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.detach() * len(y)
            log.info("finetune epoch %d/%d: loss %.4f", epoch + 1, spec.epochs,
                     total.item() / (len(loader) * batch))
    return model.eval()
