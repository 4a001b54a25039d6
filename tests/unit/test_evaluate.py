import math

import pytest
import torch
import torch.nn as nn

from leoclr_core.training.engine import Runtime
from leoclr_core.evaluation.probes import accuracy, evaluate_backbone, knn_predict, linear_probe, prepare_images


def reference_knn(bank, labels, queries, num_classes, k, t):
    """One query at a time in float64 with plain Python sorting: an independent reference."""
    bank = torch.nn.functional.normalize(bank.double(), dim=1)
    queries = torch.nn.functional.normalize(queries.double(), dim=1)
    preds = []
    for q in queries:
        sims = sorted(((float(q @ b), int(y)) for b, y in zip(bank, labels)), reverse=True)[:k]
        votes = [0.0] * num_classes
        for s, y in sims:
            votes[y] += math.exp(s / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,t", [(1, 0.1), (7, 0.1), (20, 0.5)])
def test_knn_matches_reference(k, t):
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    got = knn_predict(bank, labels, queries, 4, k=k, temperature=t, chunk=7)
    assert torch.equal(got, reference_knn(bank, labels, queries, 4, k, t))


def test_knn_on_separated_clusters_is_perfect_and_k_is_capped_by_the_bank():
    centres = torch.eye(3) * 10
    bank = centres.repeat_interleave(5, 0) + 0.1 * torch.randn(15, 3)
    labels = torch.arange(3).repeat_interleave(5)
    queries = centres + 0.1 * torch.randn(3, 3)
    assert accuracy(knn_predict(bank, labels, queries, 3, k=200), torch.arange(3)) == 100.0


def test_knn_rejects_bad_parameters_and_accuracy_needs_samples():
    with pytest.raises(ValueError):
        knn_predict(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), torch.randn(1, 2), 2, k=0)
    with pytest.raises(ValueError, match="zero test samples"):
        accuracy(torch.empty(0), torch.empty(0))


def test_linear_probe_learns_a_linearly_separable_problem():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 3, generator=g)
    x = torch.randn(600, 16, generator=g) * 5 + 3  # scale and offset: the probe standardises
    y = (x @ w).argmax(1)
    acc = linear_probe(x[:500], y[:500], x[500:], y[500:], 3, epochs=30, lr=0.1)
    assert acc >= 90.0


def test_prepare_images_resizes_the_whole_image_and_normalises():
    img = torch.full((2, 3, 8, 12), 255, dtype=torch.uint8)
    x = prepare_images(img, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (2, 3, 4, 4)
    assert torch.allclose(x, torch.full_like(x, 2.0))


class _Pixels(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class _Images(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        y = int(self.labels[i])
        img = torch.zeros(3, 4, 4, dtype=torch.uint8)
        img[y] = 200  # the class is the lit channel
        return img, y, 0


def test_evaluate_backbone_runs_both_protocols_and_refuses_unlabelled_data():
    labels = torch.arange(3).repeat(10)
    cpu = Runtime(torch.device("cpu"))
    res = evaluate_backbone(_Pixels(), _Images(labels), _Images(labels[:9]), cpu, num_classes=3, size=4,
                            mean=(0, 0, 0), std=(1, 1, 1), linear=True, k=5, probe_epochs=20)
    assert res.knn_top1 == 100.0 and res.linear_top1 == 100.0
    assert res.as_metrics() == {"knn_top1": 100.0, "linear_top1": 100.0}
    with pytest.raises(ValueError, match="labelled"):
        evaluate_backbone(_Pixels(), _Images(torch.full((4,), -1)), _Images(labels[:3]), cpu, num_classes=3,
                          size=4, mean=(0, 0, 0), std=(1, 1, 1))
