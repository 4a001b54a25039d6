"""The fine-tuning protocol (evaluation/finetune.py): the class-balanced labelled subset, the fine-tune
of a copy of a tiny backbone, the evaluate job with protocol finetune, its spec and the promotion
metric it measures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leoclr_core.evaluation.finetune import balanced_subset, finetune
from leoclr_core.nn.model import build_backbone
from leoclr_core.spec.models import FinetuneSpec, ModelSpec, SpecError, labelled_per_class, parse_spec
from leoclr_core.training.engine import Runtime

CPU = Runtime(torch.device("cpu"))
# Six uniform colours: a crop or a flip keeps the class, so a fine-tune can learn it in a few steps.
COLOURS = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.uint8) * 200


class _Colours(torch.utils.data.Dataset):
    """Uniform 8 px images whose class is their colour, with a little noise."""

    def __init__(self, labels, seed):
        self.labels = np.asarray(labels, dtype=np.int64)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randint(0, 40, (len(self.labels), 3, 8, 8), generator=g, dtype=torch.uint8)
        self.images = COLOURS[torch.from_numpy(self.labels)][:, :, None, None] + noise

    @property
    def targets(self):
        return self.labels.copy()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), 0


def _tuned(backbone, spec, seed=0):
    train, test = _Colours(np.arange(120) % 6, seed=1), _Colours(np.arange(60) % 6, seed=2)
    return finetune(backbone, train, test, CPU, spec, num_classes=6, size=8, mean=(0.5,) * 3, std=(0.25,) * 3,
                    seed=seed)


# ---------------------------------------------------------------- the labelled subset
def test_the_subset_takes_a_rounded_fraction_of_each_class_and_at_least_one():
    labels = np.repeat([0, 1, 2, 3], [100, 50, 15, 10])
    picked = balanced_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[picked]).tolist() == [10, 5, 2, 1]  # 1.5 rounds up
    assert np.array_equal(picked, np.sort(picked)) and len(set(picked.tolist())) == len(picked)
    assert [labelled_per_class(f, n) for f, n in [(0.1, 5), (0.01, 50), (0.29, 50), (1.0, 7)]] == [1, 1, 15, 7]


def test_the_subset_is_seeded_and_a_smaller_fraction_lies_inside_a_larger_one():
    labels = np.random.default_rng(0).integers(0, 5, 1000)
    a = balanced_subset(labels, 0.1, seed=3)
    assert np.array_equal(a, balanced_subset(labels, 0.1, seed=3))
    assert not np.array_equal(a, balanced_subset(labels, 0.1, seed=4))
    assert set(balanced_subset(labels, 0.01, seed=3)) <= set(a)
    # a class's picks do not depend on the other classes
    only_0 = balanced_subset(np.where(labels == 0, 0, -1)[labels == 0], 0.1, seed=3)
    assert np.array_equal(np.flatnonzero(labels == 0)[only_0], a[labels[a] == 0])


def test_a_fraction_that_leaves_a_class_less_than_one_image_is_refused():
    labels = np.repeat([0, 1, 2], [500, 300, 40])
    with pytest.raises(ValueError, match=r"eval\.finetune\.label_fraction \(0\.01\) gives 0\.4 labelled images per "
                                         r"class: class 2 has 40 images.* at least 0\.025 for this data"):
        balanced_subset(labels, 0.01, seed=0)
    assert len(balanced_subset(labels, 0.025, seed=0)) == 13 + 8 + 1
    with pytest.raises(ValueError, match="unlabelled"):
        balanced_subset(np.array([0, 1, -1]), 0.5, seed=0)


# ---------------------------------------------------------------- the fine-tune
def test_finetune_learns_an_easy_task_and_leaves_the_loaded_backbone_as_it_was():
    torch.manual_seed(0)
    backbone, _ = build_backbone(ModelSpec(backbone="tiny", width=4))
    backbone.eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    spec = FinetuneSpec(label_fraction=1.0, epochs=6, lr=0.05, batch_size=12, crop_scale=(0.5, 1.0))
    rng_before = torch.get_rng_state()
    result = _tuned(backbone, spec)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    assert result.labelled_images == 120 and result.label_fraction == 1.0
    assert 0 <= result.top1 <= 100 and result.top1 <= result.top5 <= 100
    assert result.top1 > 50  # chance is 16.7
    assert result.as_metrics() == {"finetune_top1": result.top1, "finetune_top5": result.top5}
    assert not backbone.training
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_finetune_is_deterministic_for_a_seed_on_the_cpu():
    torch.manual_seed(0)
    backbone, _ = build_backbone(ModelSpec(backbone="tiny", width=4))
    spec = FinetuneSpec(label_fraction=0.2, epochs=2, lr=0.05, batch_size=8)
    assert _tuned(backbone, spec, seed=5) == _tuned(backbone, spec, seed=5)


# ---------------------------------------------------------------- the job and its spec
DATA = {"num_images": 60, "num_test_images": 30, "image_size": 16,
        "synthetic": {"source_size": 16, "num_classes": 3, "object_size": [8, 14], "distractor_size": [4, 8],
                      "clutter": 2}}


def test_an_evaluate_job_with_protocol_finetune_writes_its_results(tmp_path):
    from leoclr_core.evaluation.job import evaluate_job
    from leoclr_core.training.checkpoint import save_encoder

    model = ModelSpec(width=4)
    backbone, _ = build_backbone(model)
    encoder = save_encoder(tmp_path / "enc" / "encoder.pt", backbone.eval(), model)
    spec = parse_spec({"kind": "evaluate", "name": "ft", "output_dir": str(tmp_path / "eval"),
                       "encoder": {"checkpoint": str(encoder)}, "protocol": "finetune", "data": DATA,
                       "eval": {"finetune": {"label_fraction": 0.1, "epochs": 1, "batch_size": 4}}})
    result = evaluate_job(spec)
    assert 0 <= result["finetune_top1"] <= 100 and "finetune_top5" not in result  # 3 classes
    assert result["finetune"] == {"label_fraction": 0.1, "labelled_images": 6}
    assert result["protocol"] == "finetune" and "knn_top1" not in result
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["finetune_top1"] == result["finetune_top1"]


@pytest.mark.parametrize("raw, expected", [
    ({"protocol": "finetune", "eval": {"finetune": {"label_fraction": 0.01}}},
     "eval.finetune.label_fraction (0.01) gives 0.2 labelled images per class: the smallest class "
     "(data.num_images 60 over 3 classes) has 20 images, so it would get less than one; label_fraction must "
     "be at least 0.05"),
    ({"protocol": "finetune", "eval": {"finetune": {"label_fraction": 0}}},
     "eval.finetune.label_fraction: Input should be greater than 0"),
    ({"protocol": "finetune", "eval": {"finetune": {"label_fraction": 1.5}}},
     "eval.finetune.label_fraction: Input should be less than or equal to 1"),
    ({"protocol": "finetune", "eval": {"finetune": {"epochs": 10**9}}},
     "eval.finetune.epochs: Input should be less than or equal to"),
    ({"protocol": "finetune", "eval": {"finetune": {"batch_size": 1}}},
     "eval.finetune.batch_size: Input should be greater than or equal to 2"),
    ({"protocol": "finetune", "eval": {"finetune": {"crop_scale": [0.9, 0.1]}}},
     "eval.finetune.crop_scale: crop_scale must satisfy 0 < low <= high <= 1"),
    ({"protocol": "knn", "eval": {"finetune": {"label_fraction": 0.5}}},
     "eval.finetune is read by protocol finetune only, not 'knn'"),
    ({"protocol": "knn", "encoder": {"model_uri": "models:/m/1"}, "promote": {"metric": "finetune_top1"}},
     "promote.metric finetune_top1 is not measured by protocol 'knn'"),
    ({"protocol": "finetune", "encoder": {"model_uri": "models:/m/1"}, "promote": {"metric": "linear_top1"}},
     "promote.metric linear_top1 is not measured by protocol 'finetune'"),
])
def test_finetune_specs_are_checked_naming_the_field(raw, expected):
    base = {"kind": "evaluate", "encoder": {"checkpoint": "runs/demo"}, "data": DATA}
    with pytest.raises(SpecError) as err:
        parse_spec({**base, **raw})
    assert expected in str(err.value)


def test_a_finetune_spec_is_accepted_and_a_pretrain_refuses_what_it_would_not_read():
    spec = parse_spec({"kind": "evaluate", "encoder": {"model_uri": "models:/m/1"}, "protocol": "finetune",
                       "eval": {"finetune": {"label_fraction": 0.01}}, "promote": {"metric": "finetune_top1"}})
    assert spec.eval.finetune.label_fraction == 0.01 and spec.promote.metric == "finetune_top1"
    with pytest.raises(SpecError, match="eval.finetune is read by an evaluate job's protocol finetune"):
        parse_spec({"eval": {"finetune": {"epochs": 3}}})
    with pytest.raises(SpecError, match="finetune_top1 is measured by an evaluate job"):
        parse_spec({"register": {"model_name": "m", "promote": {"metric": "finetune_top1"}}})


def test_a_promotion_by_finetune_top1_measures_the_holder_with_the_same_protocol(monkeypatch):
    from leoclr_core.distributed import evaluate as ev

    asked = []
    monkeypatch.setattr(ev, "_run_task", lambda spec, s, sheet=False: asked.append(spec) or {"finetune_top1": 42.0})
    spec = parse_spec({"kind": "evaluate", "seed": 7, "encoder": {"model_uri": "models:/m/1"},
                       "protocol": "finetune", "eval": {"finetune": {"label_fraction": 0.5, "epochs": 2}}})
    measured = ev.measure_version("m", "3", "finetune_top1", spec.data, spec.eval, spec.scaling, seed=spec.seed)
    assert measured == 42.0
    (holder,) = asked
    assert (holder.protocol, holder.eval, holder.seed, holder.encoder.model_uri) == ("finetune", spec.eval, 7,
                                                                                      "models:/m/3")
