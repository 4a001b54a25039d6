"""The views bench on CPU: every stage and implementation timed, kornia's beside ours, bad input refused."""

import json

import pytest
import torch

from bench.views import IMPLS, KorniaViews, main, markdown
from leoclr_core.spec.models import AugmentSpec

from .test_bench import TINY as BENCH_TINY

pytestmark = pytest.mark.filterwarnings("ignore:.*TorchCodec:DeprecationWarning")

# The bench's tiny spec, with its own name and a batch of 8 (views are made per batch).
TINY = {**BENCH_TINY, "name": "tiny-views", "augment": {}, "optim": {"batch_size": 8}}


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(TINY))
    return path


def test_times_each_stage_and_each_implementation(spec_file, tmp_path, capsys):
    out = tmp_path / "views.json"
    impls = [i for i in IMPLS if not i.endswith("compiled")]  # compiling is the slow test's job
    args = [str(spec_file), "--device", "cpu", "--reps", "1", "--warmup", "0", "--jpeg", "--json", str(out)]
    assert main(args + [a for i in impls for a in ("--impl", i)]) == 0
    record = json.loads(out.read_text())
    assert record["batch"] == 8 and record["views"] == ["original", "crop", "crop"] and record["view_px"] == 16
    names = {(r["group"], r["name"]) for r in record["rows"]}
    assert ("input", "JPEG decode (batched)") in names
    assert {"colour jitter", "blur (grouped conv)", "blur (batched matmul)"} <= {n for g, n in names if g == "stage"}
    whole = {r["name"]: r for r in record["rows"] if r["group"] == "whole"}
    assert set(whole) == set(impls)
    for name, row in whole.items():
        if name == "kornia" and "error" in row:
            assert row["error"].startswith("not installed")
            continue
        assert row["ms"] > 0 and row["inst_per_s"] == pytest.approx(8 / row["ms"] * 1e3)
    assert "| whole: ours |" in capsys.readouterr().out


def test_kornia_views_have_our_shapes_and_are_normalised():
    pytest.importorskip("kornia")
    images = torch.randint(0, 256, (4, 3, 24, 20), dtype=torch.uint8)
    views = KorniaViews(AugmentSpec(), 16, (0.5,) * 3, (0.25,) * 3, ("original", "crop", "crop"))(images)
    assert len(views) == 3
    for v in views:
        assert v.shape == (4, 3, 16, 16) and torch.isfinite(v).all()
        raw = v * 0.25 + 0.5
        assert raw.min() >= -1e-4 and raw.max() <= 1 + 1e-4


def test_markdown_names_a_failed_row():
    record = {"batch": 2, "source_px": [8, 8], "views": ["crop", "crop"], "view_px": 4, "device_name": "cpu",
              "torch": "x", "rows": [{"group": "whole", "name": "kornia", "error": "not installed: kornia"},
                                     {"group": "stage", "name": "flip", "ms": 2.0, "inst_per_s": 1000.0}]}
    text = markdown(record)
    assert "| kornia | not installed: kornia | - |" in text and "| stage: flip | 2.00 | 1,000 |" in text


@pytest.mark.parametrize("args, message", [(["--reps", "0"], "--reps and --batch"),
                                           (["--set", "optim.batch_size=-1"], "batch_size")])
def test_bad_arguments_exit_2_with_the_reason(spec_file, capsys, args, message):
    assert main([str(spec_file), "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err
