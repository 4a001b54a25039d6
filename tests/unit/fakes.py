"""What the service's unit tests share: a stand-in for Ray Jobs, specs, an app on a temp folder, and an
MLflow store (SQLite) to write what a job's driver would."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings

SPEC = {"kind": "pretrain", "name": "api-demo", "data": {"num_images": 512}, "loss": {"queue_size": 128},
        "optim": {"batch_size": 64}}
TUNE = {"kind": "tune", "name": "search-api", "base": SPEC, "metric": "knn_top1",
        "space": {"optim.lr": {"type": "choice", "values": [0.01, 0.1]}}}
TOKEN = "secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeRunner:
    """Ray Jobs as far as the API sees it: submissions recorded, a status the test sets, no training."""

    log_text = ""

    def __init__(self, fail: bool = False):
        self.submitted, self.stopped, self.fail, self.state = [], [], fail, "running"

    def submit(self, job_id, spec):
        if self.fail:
            raise ConnectionError("cluster unreachable")
        self.submitted.append((job_id, spec))
        return f"leoclr-{job_id}"

    def status(self, submission_id):
        return self.state

    def stop(self, submission_id):
        self.stopped.append(submission_id)
        return self.state not in ("succeeded", "failed", "cancelled", "lost")

    def logs(self, submission_id):
        return self.log_text

    async def tail(self, submission_id):
        for line in self.log_text.splitlines(keepends=True):
            yield line

    def ping(self):  # the Jobs API answers
        return None

    def cluster_resources(self):  # room for any test job
        return {"CPU": 64.0, "GPU": 8.0}


class ServiceClient(TestClient):
    """The app's TestClient, entered once its tracking store is prepared: until then the gate holds
    every job queued (LazyTracking.store_ready), and these tests expect a job handed over at once."""

    def __enter__(self):
        client = super().__enter__()
        deadline = time.monotonic() + 60
        while not client.app.state.tracking.store_ready():
            assert time.monotonic() < deadline, "the tracking store was not prepared within 60 s"
            time.sleep(0.05)
        return client


@pytest.fixture()
def make_client(tmp_path):
    def make(runner=None, **settings):
        s = ServiceSettings(data_dir=tmp_path, api_token=TOKEN, **settings)
        # fresh_s=0: every read asks the runner, as these tests change its answers between reads
        return ServiceClient(create_app(s, runner if runner is not None else FakeRunner(), fresh_s=0))
    return make


def mlflow_store(tmp_path):
    """(tracking URI, client) of an MLflow store in `tmp_path`, its artifacts there too (MLflow's
    default for a SQLite store is ./mlruns of the folder pytest runs in)."""
    from mlflow.tracking import MlflowClient

    class Store(MlflowClient):
        def create_experiment(self, name, artifact_location=None, tags=None):
            location = artifact_location or (tmp_path / "artifacts" / name).as_uri()
            return super().create_experiment(name, location, tags)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, Store(tracking_uri=uri, registry_uri=uri)


def driver_run(ml, job_id: str, experiment: str, result: dict | None = None) -> str:
    """The MLflow run a job's driver makes (tagged with the job's id), with the result it logs last."""
    from leoclr_core import contract

    exp = ml.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else ml.create_experiment(experiment)
    run = ml.create_run(exp_id, tags={contract.TAG_SERVICE_JOB: job_id}).info.run_id
    if result is not None:
        ml.log_dict(run, result, contract.RESULT_ARTIFACT)
    return run
