"""The method study (leoclr_core/studies/method_study.py): its statistics, its resume, the controls'
views (each changes what it says and nothing else), the crop evaluation, and one quick study end
to end through the CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF
from typer.testing import CliRunner

from leoclr_core.cli.app import app
from leoclr_core.evaluation.crops import FixedCrops, knn_on_crops
from leoclr_core.nn.model import build_backbone
from leoclr_core.spec import models as spec_models
from leoclr_core.spec.models import AugmentSpec, ModelSpec, SpecError, parse_spec
from leoclr_core.studies import method_study as ms
from leoclr_core.training.engine import Runtime
from leoclr_core.views import batched as A
from leoclr_core.views.transforms import KindsViewTransform, TripleViewTransform, make_view_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NO_ORIGINAL_AUG = AugmentSpec(original_photometric=False, original_flip=False)
CPU = Runtime(torch.device("cpu"))


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 5, 5, generator=g)
    return (F.interpolate(low, size=(h, w), mode="bicubic", align_corners=True).clamp(0, 1) * 255).round().byte()


# ---------------------------------------------------------------- statistics
def test_t_quantile_table_and_expansion():
    assert ms.t975(1) == pytest.approx(12.706, abs=1e-3) and ms.t975(2) == pytest.approx(4.303, abs=1e-3)
    assert ms.t975(30) == pytest.approx(2.042, abs=1e-3)
    assert ms.t975(1000) == pytest.approx(1.962, abs=1e-3)
    special = pytest.importorskip("scipy.special")
    for df in range(1, 200):
        assert ms.t975(df) == pytest.approx(special.stdtrit(df, 0.975), abs=2e-4), df
    with pytest.raises(ValueError):
        ms.t975(0)


def test_paired_ci_against_a_hand_computed_example():
    # d = 2, 1, 4: mean 7/3, sd sqrt(7/3) = 1.5275, half-width t(0.975, 2) sd / sqrt 3 = 4.3027 x 0.8819 = 3.7946
    p = ms.paired_ci([10.0, 12.0, 14.0], [8.0, 11.0, 10.0])
    assert p.n == 3 and p.mean == pytest.approx(2.3333, abs=1e-4) and p.sd == pytest.approx(1.5275, abs=1e-4)
    assert (p.low, p.high) == (pytest.approx(-1.4613, abs=1e-3), pytest.approx(6.1280, abs=1e-3))
    assert p.sign == "0" and ms.lead_of(p, "LeOCLR", "MoCo-v2") == "none (CI holds 0)"
    # d = 3, 4, 5: mean 4, sd 1, half-width 4.3027 / sqrt 3 = 2.4842: the interval excludes 0
    p = ms.paired_ci([13.0, 14.0, 15.0], [10.0, 10.0, 10.0])
    assert (p.low, p.high) == (pytest.approx(1.5158, abs=1e-3), pytest.approx(6.4842, abs=1e-3))
    assert ms.lead_of(p, "LeOCLR", "MoCo-v2") == "LeOCLR"
    assert ms.lead_of(ms.paired_ci([1.0, 2.0, 3.0], [5.0, 7.0, 6.0]), "LeOCLR", "MoCo-v2") == "MoCo-v2"
    one = ms.paired_ci([1.0], [0.0])
    assert one.sign == "?" and math.isnan(one.low) and math.isnan(one.sd)
    with pytest.raises(ValueError, match="equal lengths"):
        ms.paired_ci([1.0, 2.0], [1.0])


def _record(cell, arm, seed, config="c", **metrics):
    return {"cell": cell, "coords": {"width": 16}, "arm": arm, "seed": seed, "config": config,
            "metrics": metrics, "seconds": 1.0}


def test_summary_pairs_arms_by_seed_and_reads_the_hypotheses():
    records = [_record("base", "LeOCLR", s, knn_top1=v, knn_crops_top1=c) for s, v, c in
               [(0, 13.0, 5.0), (1, 14.0, 6.0), (2, 15.0, 4.0)]]
    records += [_record("base", "MoCo-v2", s, knn_top1=10.0, knn_crops_top1=c) for s, c in
                [(0, 10.0), (1, 12.0), (2, 11.0), (3, 99.0)]]  # seed 3 has no LeOCLR pair: left out
    summary, diffs = ms.summarize(records)
    moco = next(s for s in summary if s["arm"] == "MoCo-v2" and s["metric"] == "knn_top1")
    assert moco["n"] == 4 and moco["mean"] == 10.0 and moco["sd"] == 0.0
    knn = next(d for d in diffs if d["metric"] == "knn_top1")
    assert (knn["a"], knn["b"], knn["n"]) == ("LeOCLR", "MoCo-v2", 3)
    assert (knn["ci_low"], knn["ci_high"]) == (pytest.approx(1.5158, abs=1e-3), pytest.approx(6.4842, abs=1e-3))
    assert knn["lead"] == "LeOCLR"
    crops = next(d for d in diffs if d["metric"] == "knn_crops_top1")
    assert crops["mean"] == pytest.approx(-6.0) and crops["sign"] == "-"
    rows = ms.read_hypotheses(diffs)
    first = rows[0]  # LeOCLR - MoCo-v2 on crops: H1 predicts +, H2 0 or -
    assert first["sign"] == "-" and first["agrees"] == [ms.H2]
    assert all(r["sign"] == "?" for r in rows[1:] if r["observed"] is None)
    assert "H2 view match: 1 met and 0 contradicted by an interval that excludes 0; 0 undecided" in ms.verdict(rows)
    assert "H1 crop semantics: 0 met and 1 contradicted" in ms.verdict(rows)
    # An interval holding 0 decides nothing, whichever hypothesis a 0 would fit.
    held = [{**first, "sign": "0", "agrees": [ms.H2]}]
    assert "H2 view match: 0 met and 0 contradicted by an interval that excludes 0; 1 undecided (the interval holds 0; " \
           "a 0 is what 1 of them predict)" in ms.verdict(held)


def test_records_resume_skips_finished_runs_and_reruns_a_changed_config(tmp_path):
    path = tmp_path / "records.jsonl"
    cell = ms.Cell("base", (), {})
    runs = [ms.Run(cell, arm, seed) for seed in (0, 1) for arm in ("LeOCLR", "MoCo-v2")]
    configs = {r.key: "new" for r in runs}
    ms.append_record(path, _record("base", "LeOCLR", 0, config="new", knn_top1=1.0))
    ms.append_record(path, _record("base", "MoCo-v2", 0, config="old", knn_top1=2.0))  # another config
    with path.open("a") as fh:
        fh.write('{"cell": "base", "arm": "LeOCLR", "seed": 1, "con')  # a line cut short by a kill
    records = ms.read_records(path)
    assert len(records) == 2
    todo = ms.pending(runs, configs, records)
    assert [r.key for r in todo] == [("base", "MoCo-v2", 0), ("base", "LeOCLR", 1), ("base", "MoCo-v2", 1)]
    assert [r["arm"] for r in ms.current(records, configs)] == ["LeOCLR"]


def test_plan_puts_controls_in_the_base_cell_and_seeds_first():
    cells = ms.cells_of(ms.TINY.axes, {"width": 16, "epochs": 20, "view": 16})
    assert [c.name for c in cells] == ["base", "width=8", "width=32", "width=64", "epochs=10", "epochs=40", "view=12",
                                       "view=24"]
    assert cells[0].coords == {"width": 16, "epochs": 20, "view": 16} and cells[1].overrides == ("model.width=8",)
    runs = ms.plan_runs(cells, [0, 1, 2])
    assert len(runs) == 3 * (8 * 3 + 3)
    assert {r.arm for r in runs if r.cell.name != "base"} == {"LeOCLR", "MoCo-v2", "random-init"}
    assert [r.seed for r in runs[:27]] == [0] * 27
    assert len(ms.plan_runs(cells, [0], controls="all")) == 8 * 6
    with pytest.raises(ValueError, match="controls"):
        ms.plan_runs(cells, [0], controls="some")


def test_each_arm_is_a_valid_spec_and_seeds_set_init_views_and_data(tmp_path):
    study = ms.Study(tmp_path, seeds=2)
    specs = {k: s for k, s in study.specs.items() if k[0] == "base" and k[2] == 1}
    assert specs[("base", "LeOCLR", 1)].view_kinds == ("original", "crop", "crop")
    assert specs[("base", "LeOCLR-window", 1)].view_kinds == ("window", "crop", "crop")
    assert specs[("base", "MoCo-v2-whole-query", 1)].view_kinds == ("original", "crop")
    assert specs[("base", "MoCo-v2-whole-key", 1)].view_kinds == ("crop", "original")
    assert all(s.seed == 1 and s.data.seed == 1 for s in specs.values())
    assert len(set(study.configs.values())) == len(study.runs)  # every run its own config
    resnet = ms.Study(tmp_path / "r", scale="resnet18", seeds=1)
    assert {s.model.backbone for s in resnet.specs.values()} == {"resnet18", "resnet34", "resnet50"}
    with pytest.raises(ValueError, match="unknown axis"):
        ms.Study(tmp_path, axes=["depth"])


# ---------------------------------------------------------------- the controls' views
def test_view_kinds_agree_between_spec_and_views():
    assert A.VIEW_KINDS == spec_models.VIEW_KINDS


def test_spec_views_replace_the_method_kinds_and_keep_their_number():
    spec = parse_spec({"kind": "pretrain", "method": "mocov2"}, ["augment.views=[crop, original]"])
    assert spec.view_kinds == ("crop", "original")
    assert parse_spec({"kind": "pretrain"}, []).view_kinds == ("original", "crop", "crop")
    with pytest.raises(SpecError, match="takes 2 views"):
        parse_spec({"kind": "pretrain", "method": "mocov2"}, ["augment.views=[original, crop, crop]"])


def test_window_control_changes_only_the_anchor_view():
    x = images(6, 40, 56)
    paper = A.BatchedViews(AugmentSpec(), 16, MEAN, STD, kinds=("original", "crop", "crop"))
    control = A.BatchedViews(AugmentSpec(), 16, MEAN, STD, kinds=("window", "crop", "crop"))
    p = paper(x, torch.Generator().manual_seed(5))
    c = control(x, torch.Generator().manual_seed(5))
    assert torch.equal(p[1], c[1]) and torch.equal(p[2], c[2])  # the crops, pixel for pixel
    assert not torch.allclose(p[0], c[0])
    # Same photometric draws on X: at scale 1 a window is the whole image, so the views are equal.
    whole = A.BatchedViews(AugmentSpec(crop_scale=(1.0, 1.0)), 16, MEAN, STD, kinds=("window", "crop", "crop"))
    paper1 = A.BatchedViews(AugmentSpec(crop_scale=(1.0, 1.0)), 16, MEAN, STD)
    w = whole(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(w[0], paper1(x, torch.Generator().manual_seed(5))[0])


@pytest.mark.parametrize("h, w", [(32, 32), (40, 100)])
def test_window_boxes_keep_the_image_aspect_at_the_crops_scale(h, w):
    boxes = A.sample_window_boxes(4000, h, w, (0.2, 1.0), torch.Generator().manual_seed(0))
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert ((bw / w - bh / h).abs() <= 1.0 / min(h, w) + 1e-6).all()  # the image's aspect, up to rounding
    frac = (bw * bh) / (w * h)
    assert frac.min() > 0.2 - 0.05 and frac.max() <= 1.0
    assert 0.55 < frac.mean() < 0.65  # a ~ U(0.2, 1): mean 0.6
    assert boxes[:, 0].unique().numel() > 10  # placed at random


def test_mocov2_uncropped_view_is_the_whole_image_and_the_other_a_crop():
    x = images(4, 32, 32)
    whole = A.BatchedViews(NO_ORIGINAL_AUG, 16, MEAN, STD, kinds=("original",))(x)[0]
    q, k = A.BatchedViews(NO_ORIGINAL_AUG, 16, MEAN, STD, kinds=("original", "crop"))(x, torch.Generator().manual_seed(0))
    assert torch.equal(q, whole) and not torch.allclose(k, whole)
    q, k = A.BatchedViews(NO_ORIGINAL_AUG, 16, MEAN, STD, kinds=("crop", "original"))(x, torch.Generator().manual_seed(0))
    assert torch.equal(k, whole) and not torch.allclose(q, whole)
    # With the default options the uncropped view is augmented exactly as a crop is (only geometry changes).
    views = A.BatchedViews(AugmentSpec(), 16, MEAN, STD, kinds=("crop", "original"))
    assert views._switches == [(True, True), (True, True)]


def test_per_sample_path_makes_the_same_kinds():
    image = images(1, 32, 32)[0]
    assert isinstance(make_view_transform("leoclr", AugmentSpec(), 16, MEAN, STD, ("original", "crop", "crop")),
                      TripleViewTransform)
    t = make_view_transform("mocov2", NO_ORIGINAL_AUG, 16, MEAN, STD, ("original", "crop"))
    assert isinstance(t, KindsViewTransform) and t.kinds == ("original", "crop")
    q, k = t(image)
    resized = TF.normalize(TF.resize(image, [16, 16], antialias=True).float() / 255, list(MEAN), list(STD))
    torch.testing.assert_close(q, resized) and q.shape == k.shape == (3, 16, 16)
    # A window at scale 1 is the whole image too.
    (wv,) = KindsViewTransform(AugmentSpec(crop_scale=(1.0, 1.0), original_photometric=False, original_flip=False),
                               16, MEAN, STD, ("window",))(image)
    torch.testing.assert_close(wv, resized)
    with pytest.raises(ValueError, match="kinds"):
        KindsViewTransform(AugmentSpec(), 16, MEAN, STD, ("whole",))


def test_the_feed_makes_the_spec_kinds_not_the_method_defaults():
    from leoclr_core.data import build_source
    from leoclr_core.nn.methods import build_method
    from leoclr_core.training.feed import ViewFeed

    spec = parse_spec({"kind": "pretrain", "method": "mocov2"}, [
        "augment.views=[crop, original]", "augment.batched=true", "data.num_images=64", "loss.queue_size=32",
        "optim.batch_size=32", "model.backbone=tiny", "model.width=4"])
    method = build_method(spec.method, spec.model, spec.loss, spec.optim.batch_size)
    feed = ViewFeed(spec, method, CPU, build_source(spec.data, "train"))
    assert feed.maker is not None and feed.maker.kinds == ("crop", "original")
    per_sample = ViewFeed(spec.model_copy(update={"augment": spec.augment.model_copy(update={"batched": False})}),
                          method, CPU, build_source(spec.data, "train"))
    assert isinstance(per_sample.dataset.transform, KindsViewTransform)
    assert per_sample.dataset.transform.kinds == ("crop", "original")


# ---------------------------------------------------------------- evaluation on crops
class _Images(torch.utils.data.Dataset):
    def __init__(self, x, labels):
        self.x, self.labels = x, labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.labels[i]), 0


def test_fixed_crops_are_seeded_and_inside_the_image():
    src = _Images(images(20, 32, 40), torch.arange(20) % 4)
    a, b, c = FixedCrops(src, 16, seed=3), FixedCrops(src, 16, seed=3), FixedCrops(src, 16, seed=4)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(20))
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(20))
    for i in range(20):
        top, left, h, w = a.box(i, 32, 40)
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 40
        assert 0.2 * 32 * 40 * 0.9 <= h * w <= 32 * 40
        assert a[i][0].shape == (3, 16, 16) and a[i][0].dtype == torch.uint8 and a[i][1] == i % 4
    torch.manual_seed(0)
    net, _ = build_backbone(ModelSpec(backbone="tiny", width=4))
    kw = dict(num_classes=4, size=16, mean=MEAN, std=STD, k=5, seed=1)
    first = knn_on_crops(net, src, src, CPU, **kw)
    assert 0 <= first <= 100 and knn_on_crops(net, src, src, CPU, **kw) == first


# ---------------------------------------------------------------- the study end to end
def test_quick_study_writes_records_tables_and_plots_and_resumes(tmp_path):
    result = CliRunner().invoke(app, ["experiment", "method-study", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    study = ms.Study(tmp_path, quick=True)
    records = ms.read_records(tmp_path / "records.jsonl")
    assert len(records) == len(study.runs) == 2 * (2 * 3 + 3)  # 2 seeds; 2 cells x 3 arms + 3 controls
    assert {r["arm"] for r in records} == set(ms.ARMS) and {r["seed"] for r in records} == {0, 1}
    first = records[0]
    assert {"cell", "arm", "seed", "config", "metrics", "seconds"} <= set(first)
    assert {"knn_top1", "linear_top1", "knn_crops_top1", "knn_view_gap", "finetune20pct_top1",
            "finetune10pct_top1"} <= set(first["metrics"])
    with (tmp_path / "differences.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {"mean_diff", "sd_diff", "ci95_low", "ci95_high", "lead"} <= set(rows[0])
    lead = [r for r in rows if r["comparison"] == "LeOCLR - MoCo-v2" and r["metric"] == "knn_top1"]
    assert {r["cell"] for r in lead} == {"base", "width=8"} and all(r["n"] == "2" for r in lead)
    assert all(float(r["ci95_low"]) <= float(r["mean_diff"]) <= float(r["ci95_high"]) for r in lead)
    with (tmp_path / "summary.csv").open() as fh:
        assert {"mean", "sd", "n"} <= set(next(csv.DictReader(fh)))
    report = (tmp_path / "report.md").read_text()
    assert "QUICK" in report and "95% CI" in report and "H1 crop semantics" in report
    assert (tmp_path / "diff-width.png").stat().st_size > 1000
    # A re-run finds every run recorded: nothing to train, the outputs rebuilt from the records.
    assert ms.pending(study.runs, study.configs, records) == []
    again = ms.run_study(tmp_path, quick=True, report_only=True)
    assert len(again["records"]) == len(records)
    assert json.loads((tmp_path / "records.jsonl").read_text().splitlines()[0]) == first
