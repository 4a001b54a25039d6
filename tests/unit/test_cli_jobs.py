"""The result a job's driver prints is also logged to the job's MLflow run, where the service reads it."""

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from leoclr_core import contract
from leoclr_core.cli import jobs


def _run_in_mlflow(tmp_path, monkeypatch):
    from leoclr_core import tracking

    monkeypatch.setenv("LEOCLR_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    c = tracking.client()
    run = c.create_run(tracking.ensure_experiment(c, "cli-result"))
    c.set_terminated(run.info.run_id, "FINISHED")  # a driver logs its result after the run has ended
    return c, run.info.run_id


def test_a_jobs_result_is_logged_to_its_run_exactly_as_printed(tmp_path, monkeypatch, capsys):
    c, run_id = _run_in_mlflow(tmp_path, monkeypatch)
    result = {"name": "demo", "out_dir": tmp_path / "run", "mlflow_run_id": run_id, "knn_top1": 41.5,
              "registry_uri": "models:/demo@candidate", "model_version": "3", "table": [{"trial": "t0", "lr": 0.1}]}
    jobs.finish(result)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (tmp_path / "dl").mkdir()
    logged = json.loads(Path(c.download_artifacts(run_id, contract.RESULT_ARTIFACT, str(tmp_path / "dl"))).read_text())
    assert logged == printed
    assert printed["out_dir"] == str(tmp_path / "run") and printed["knn_top1"] == 41.5


def test_a_result_without_an_mlflow_run_is_only_printed(monkeypatch, capsys):
    from leoclr_core import tracking

    monkeypatch.setattr(tracking, "log_result", lambda *a, **k: (_ for _ in ()).throw(AssertionError("logged")))
    jobs.finish({"name": "local", "knn_top1": 12.0})  # a --local run: no MLflow
    assert json.loads(capsys.readouterr().out) == {"name": "local", "knn_top1": 12.0}


def test_a_result_mlflow_refuses_is_still_printed_with_a_warning(monkeypatch):
    from leoclr_core import tracking

    def refuse(run_id, result, settings=None):
        raise RuntimeError("tracking server gone")

    monkeypatch.setattr(tracking, "log_result", refuse)
    app = typer.Typer()
    app.command()(lambda: jobs.finish({"name": "x", "mlflow_run_id": "r1"}))
    out = CliRunner().invoke(app, [])
    assert out.exit_code == 0
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"name": "x", "mlflow_run_id": "r1"}
    assert "not logged to MLflow run r1: tracking server gone" in " ".join(out.output.split())
