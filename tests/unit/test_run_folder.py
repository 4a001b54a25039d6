"""The run folder: one writer for the in-process runner and the Ray driver."""

import json

from leoclr_core.spec.models import parse_spec
from leoclr_core.training.run_folder import RunFolder


def test_records_survive_a_resume_up_to_its_checkpoint(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.records() == [] and folder.summary_run_id() is None  # nothing yet: no error
    for epoch in (1, 2, 3):
        folder.append({"type": "step", "epoch": epoch, "step": epoch * 10})
        folder.append({"type": "epoch", "epoch": epoch, "loss": 1.0 / epoch})
    kept = folder.keep_until(2)
    assert [r["epoch"] for r in kept] == [1, 2]
    assert [(r["type"], r["epoch"]) for r in folder.records()] == [
        ("step", 1), ("epoch", 1), ("step", 2), ("epoch", 2)]
    folder.clear_records()
    assert folder.records() == [] and folder.keep_until(5) == []


def test_summary_names_its_run(tmp_path):
    spec = parse_spec({"kind": "pretrain", "name": "s", "output_dir": str(tmp_path)})
    folder = RunFolder(tmp_path)
    folder.create(spec)
    path = folder.write_summary(spec, {"loss": 0.5}, mlflow_run_id="abc")
    summary = json.loads(path.read_text())
    assert summary["name"] == "s" and summary["final"] == {"loss": 0.5} and summary["epochs"] == spec.optim.epochs
    assert folder.summary_run_id() == "abc"
    assert json.loads((tmp_path / "spec.json").read_text())["name"] == "s"
    folder.summary.write_text("{not json")
    assert folder.summary_run_id() is None
