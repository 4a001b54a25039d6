"""What the service's unit tests share: a stand-in for Ray Jobs, specs, an app on a temp folder with
its job store on SQLite or PostgreSQL (`job_database`: each test runs on both), and an MLflow store
(SQLite) to write what a job's driver would."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from pathlib import Path

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
    every job queued (LazyTracking.store_ready), and these tests expect a job handed over at once.
    Its job store's connections are closed when it exits (a PostgreSQL server counts them)."""

    def __enter__(self):
        client = super().__enter__()
        deadline = time.monotonic() + 60
        while not client.app.state.tracking.store_ready():
            assert time.monotonic() < deadline, "the tracking store was not prepared within 60 s"
            time.sleep(0.05)
        return client

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            store = getattr(self.app.state, "store", None)
            if store is not None:
                store.close()


_EMPTY_MLFLOW: list[Path] = []


def empty_mlflow_db() -> Path:
    """An MLflow SQLite database with its schema and nothing else, made once a session: creating the
    schema (MLflow's migrations) took 3 s of every app and MLflow store these tests make; a copy, none."""
    if not _EMPTY_MLFLOW:
        from service.tracking import LazyTracking

        folder = Path(tempfile.mkdtemp(prefix="leoclr-mlflow-schema-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        LazyTracking(f"sqlite:///{folder / 'mlflow.db'}")()
        _EMPTY_MLFLOW.append(folder / "mlflow.db")
    return _EMPTY_MLFLOW[0]


def fresh_mlflow_db(path: Path) -> None:
    """An empty MLflow store at `path` (a copy of empty_mlflow_db), unless one is there."""
    if not path.exists():
        shutil.copy(empty_mlflow_db(), path)


@pytest.fixture()
def make_client(tmp_path, job_database):
    """make(runner, **settings, **create_app options): an app on `tmp_path`, its job store at
    `job_database`, its MLflow store a copy of an empty one (unless the test made one there first)."""
    def make(runner=None, reconcile_interval: float = 2.0, fresh_s: float = 0, **settings):
        s = ServiceSettings(data_dir=tmp_path, api_token=TOKEN, database_url=job_database, **settings)
        if s.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}":
            fresh_mlflow_db(tmp_path / "mlflow.db")
        # fresh_s=0: every read asks the runner, as these tests change its answers between reads
        return ServiceClient(create_app(s, runner if runner is not None else FakeRunner(), fresh_s=fresh_s,
                                        reconcile_interval=reconcile_interval))
    return make


def mlflow_store(tmp_path):
    """(tracking URI, client) of an MLflow store in `tmp_path`, its artifacts there too (MLflow's
    default for a SQLite store is ./mlruns of the folder pytest runs in)."""
    from mlflow.tracking import MlflowClient

    class Store(MlflowClient):
        def create_experiment(self, name, artifact_location=None, tags=None):
            location = artifact_location or (tmp_path / "artifacts" / name).as_uri()
            return super().create_experiment(name, location, tags)

    fresh_mlflow_db(Path(tmp_path) / "mlflow.db")
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
