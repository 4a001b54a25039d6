"""The MLflow layer on a real SQLite store, without Ray: runs found again on resume, metrics,
the logged encoder and the registry."""

from __future__ import annotations

import time

import pytest
import torch

from leoclr_core import tracking
from leoclr_core.nn.model import build_backbone
from leoclr_core.settings import CoreSettings
from leoclr_core.spec.models import parse_spec
from leoclr_core.training.callbacks import RunState
from tests.backends import start_mlflow

from .conftest import tiny_spec


@pytest.fixture()
def settings(tmp_path):
    return CoreSettings(data_dir=tmp_path / "data")


def test_a_resumed_job_continues_its_unfinished_run_and_a_finished_one_starts_anew(settings, tmp_path):
    spec = parse_spec(tiny_spec("resume-me", tmp_path))
    first = tracking.start_job_run(spec, "/storage/resume-me", settings=settings)
    run = tracking.client(settings).get_run(first)
    assert run.data.params["optim.batch_size"] == "64" and run.data.tags[tracking.TAG_JOB] == "resume-me"
    # the driver died: the run is still RUNNING, and the same job on the same storage finds it
    assert tracking.start_job_run(spec, "/storage/resume-me", settings=settings) == first
    # another storage path is another job's run
    assert tracking.start_job_run(spec, "/elsewhere/resume-me", settings=settings) != first
    tracking.end_run(first, "FINISHED", settings=settings)
    assert tracking.start_job_run(spec, "/storage/resume-me", settings=settings) != first


def test_ending_a_run_keeps_the_status_something_else_closed_it_with(settings, tmp_path):
    # A search trial ASHA stopped: the search's driver closes its run as KILLED, and the trial's
    # own ending (an interrupted fit, so FAILED) may come after.
    spec = parse_spec(tiny_spec("trial", tmp_path))
    run_id = tracking.start_job_run(spec, "/s/trial", settings=settings)
    tracking.client(settings).set_terminated(run_id, "KILLED")
    tracking.end_run(run_id, "FAILED", settings=settings)
    assert tracking.client(settings).get_run(run_id).info.status == "KILLED"
    resumed = tracking.start_job_run(spec, "/s/trial", settings=settings)  # not FINISHED: resumed, RUNNING
    tracking.end_run(resumed, "FAILED", settings=settings)
    assert tracking.client(settings).get_run(resumed).info.status == "FAILED"


def test_resume_false_always_starts_a_new_run(settings, tmp_path):
    spec = parse_spec(tiny_spec("fresh", tmp_path, checkpoint={"resume": False}))
    a = tracking.start_job_run(spec, "/s/fresh", settings=settings)
    assert tracking.start_job_run(spec, "/s/fresh", settings=settings) != a


def test_callbacks_log_step_and_epoch_metrics_and_survive_a_broken_store(settings, tmp_path):
    spec = parse_spec(tiny_spec("metrics", tmp_path))
    run_id = tracking.start_job_run(spec, "/s/metrics", settings=settings)
    cb = tracking.MlflowCallbacks(run_id, settings=settings)
    cb.on_log({"type": "step", "epoch": 1, "step": 10, "loss": 5.0, "lr": 0.06, "momentum": 0.99,
               "instances_per_s": 100.0})
    state = RunState(out_dir=tmp_path, epochs=1, steps_per_epoch=10)
    cb.on_epoch({"type": "epoch", "epoch": 1, "step": 10, "loss": 4.5, "knn_top1": 31.0, "skipped_files": 2}, state)
    c = tracking.client(settings)
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "train/loss")] == [(10, 5.0)]
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "epoch/loss")] == [(1, 4.5)]
    assert c.get_metric_history(run_id, "knn_top1")[0].value == 31.0
    assert c.get_metric_history(run_id, "skipped_files")[0].value == 2
    cb.run_id = "no-such-run"  # a tracking failure is logged, never raised into the training loop
    cb.on_log({"type": "step", "epoch": 1, "step": 20, "loss": 4.0})
    # A refused request is dropped, not kept for later, and pauses nothing: the next call is made.
    cb.run_id = run_id
    cb.on_log({"type": "step", "epoch": 1, "step": 30, "loss": 3.0})
    assert [m.step for m in c.get_metric_history(run_id, "train/loss")] == [10, 30] and not cb.pending


def _step(n: int) -> dict:
    return {"type": "step", "epoch": 1 + (n - 1) // 4, "step": n, "loss": 10.0 - n, "lr": 0.06}


def test_metrics_logged_while_the_server_is_away_reach_it_once_it_is_back(tmp_path, monkeypatch):
    """A tracking server gone mid-run: the call that fails pauses the ones after it, so training does
    not wait out the client's retries on each; what was logged meanwhile goes with the first call
    after the pause that reaches the server, and the run's history has no hole."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = start_mlflow(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # mlflow.set_tracking_uri (tracking.client) exports the URI: put back for the tests after this one
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    try:
        settings = CoreSettings(data_dir=tmp_path / "data", mlflow_tracking_uri=server.url)
        run_id = tracking.start_job_run(parse_spec(tiny_spec("outage", tmp_path)), "/s/outage", settings=settings)
        cb = tracking.MlflowCallbacks(run_id, settings=settings)
        cb.PAUSE_S = 1.0
        calls: list[int] = []  # the real client, its calls counted
        send = cb.client.log_batch
        cb.client.log_batch = lambda *a, **k: (calls.append(1), send(*a, **k))[1]  # type: ignore[method-assign]
        state = RunState(out_dir=tmp_path, epochs=2, steps_per_epoch=4)
        cb.on_start(state)
        cb.on_log(_step(1))
        server.stop()
        cb.on_log(_step(2))  # refused connection: the pause begins
        made = len(calls)
        cb.on_log(_step(3))
        cb.on_epoch({"type": "epoch", "epoch": 1, "step": 4, "loss": 6.5}, state)
        assert len(calls) == made and cb.pending, "a call was made to a server that had just failed"

        server.start()
        time.sleep(cb.PAUSE_S)
        cb.on_log(_step(5))
        c = tracking.client(settings)
        assert [(m.step, m.value) for m in c.get_metric_history(run_id, "train/loss")] == \
            [(n, 10.0 - n) for n in (1, 2, 3, 5)]
        assert [(m.step, m.value) for m in c.get_metric_history(run_id, "epoch/loss")] == [(1, 6.5)]
        assert not cb.pending

        # Held back at the end of training (a pause still running): sent as the run closes.
        cb.paused_until = time.monotonic() + 60
        cb.on_log(_step(6))
        assert len(c.get_metric_history(run_id, "train/loss")) == 4
        cb.on_end(state)
        assert [m.step for m in c.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 5, 6]
    finally:
        server.stop()


def test_logged_encoder_round_trips_through_the_registry(settings, tmp_path):
    spec = parse_spec(tiny_spec("roundtrip", tmp_path))
    run_id = tracking.start_job_run(spec, "/s/roundtrip", settings=settings)
    backbone, _ = build_backbone(spec.model)
    reg = tracking.log_encoder(run_id, backbone, spec.model, spec.data, spec.register,
                               metrics={"knn_top1": 40.0}, settings=settings)
    assert reg.registry_uri == "models:/roundtrip-encoder@candidate" and reg.version == "1"
    loaded = tracking.load_encoder(reg.registry_uri, settings)
    x = torch.rand(3, 3, 16, 16)
    mean = torch.tensor(spec.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(loaded(x), backbone.eval()((x - mean) / std), atol=1e-5)
    version = tracking.client(settings).get_model_version("roundtrip-encoder", "1")
    assert version.tags["metric.knn_top1"] == "40.0"
    assert tracking.resolve_version(reg.registry_uri, settings) == ("roundtrip-encoder", "1")
    # the same run registering again (a driver that died after registering, run again) keeps its
    # version: no second version of the same encoder, the alias where it was
    reg2 = tracking.log_encoder(run_id, backbone, spec.model, spec.data, spec.register, settings=settings)
    assert reg2.version == "1" and tracking.resolve_version(reg.registry_uri, settings) == ("roundtrip-encoder", "1")
    assert len(tracking.client(settings).search_model_versions("name = 'roundtrip-encoder'")) == 1


def test_loading_an_unknown_model_names_it(settings):
    with pytest.raises(ValueError, match="models:/nothing-here@candidate"):
        tracking.load_encoder("models:/nothing-here@candidate", settings)
