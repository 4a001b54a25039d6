"""Offline evaluation of a frozen backbone: weighted k-NN and a linear probe on cached features.

Features are the backbone's (before the projection head) of the whole image, square-resized to
the view size and normalised: the same input the query encoder of LeOCLR is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from leoclr_core.training.engine import Runtime


def prepare_images(
    images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float (B,3,size,size): square resize of the whole image, then normalise."""
    x = images.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    runtime: Runtime,
    *,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 256,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (N, D) on the device, labels long (N,)) for every image of `dataset`."""
    from leoclr_core.data import collate_images

    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
    feats, labels = [], []
    try:
        for images, y, _ in loader:
            x = runtime.to_device(prepare_images(images.to(runtime.device), size, mean, std))
            with runtime.autocast():
                f = backbone(x)
            feats.append(f.float())
            labels.append(y.to(runtime.device))
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN (InstDisc/MoCo protocol): cosine similarity, votes weighted exp(sim / t)."""
    if k <= 0 or temperature <= 0:
        raise ValueError(f"k and temperature must be positive, got k={k}, temperature={temperature}")
    bank = F.normalize(train_feats.float(), dim=1)
    query = F.normalize(test_feats.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ bank.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=test_feats.device)


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if target.numel() == 0:
        raise ValueError("cannot compute an accuracy on zero test samples")
    return 100.0 * (pred == target).float().mean().item()


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    """Train a linear classifier on cached frozen features; return test top-1 accuracy (percent).

    Features are standardised with the training set's statistics (a linear probe is sensitive to
    feature scale, and the backbone's scale is arbitrary).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mu = train_feats.mean(0, keepdim=True)
    sd = train_feats.std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (train_feats - mu) / sd, (test_feats - mu) / sd
    clf = nn.Linear(xtr.shape[1], num_classes).to(xtr.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-xtr.shape[0] // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(xtr.shape[0], generator=gen).to(xtr.device)
            for start in range(0, xtr.shape[0], batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(clf(xtr[idx]), train_labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        return accuracy(clf(xte).argmax(1), test_labels)


@dataclass
class EvalResult:
    knn_top1: float | None = None
    linear_top1: float | None = None

    def as_metrics(self) -> dict[str, float]:
        out = {}
        if self.knn_top1 is not None:
            out["knn_top1"] = self.knn_top1
        if self.linear_top1 is not None:
            out["linear_top1"] = self.linear_top1
        return out


def evaluate_backbone(
    backbone: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    runtime: Runtime,
    *,
    num_classes: int,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    knn: bool = True,
    linear: bool = False,
    k: int = 200,
    knn_temperature: float = 0.1,
    probe_epochs: int = 100,
    probe_lr: float = 0.1,
    batch_size: int = 256,
) -> EvalResult:
    """Extract features once, then run the requested protocols on them."""
    common = dict(size=size, mean=mean, std=std, batch_size=batch_size)
    ftr, ytr = extract_features(backbone, train_set, runtime, **common)
    fte, yte = extract_features(backbone, test_set, runtime, **common)
    if (ytr < 0).any() or (yte < 0).any():
        raise ValueError("evaluation needs labelled images (the data source returned unlabelled ones)")
    result = EvalResult()
    if knn:
        result.knn_top1 = accuracy(knn_predict(ftr, ytr, fte, num_classes, k, knn_temperature), yte)
    if linear:
        result.linear_top1 = linear_probe(ftr, ytr, fte, yte, num_classes, epochs=probe_epochs, lr=probe_lr)
    return result
