"""What the API reads from MLflow (and the one thing it writes: an alias). No torch here, and
mlflow only once a `Tracking` is made: the API makes it on first use, so it starts without
importing mlflow (with pandas, pyarrow and scipy behind it, most of a second or more).

A job's MLflow run is found by the tag its driver sets (`leoclr.service_job` = the job's id); its
progress comes from the run's latest metrics, which rank 0 logs with every step record, and a
finished job's result from the JSON artifact its driver logs last (`contract.RESULT_ARTIFACT`).
The registry is read through the same client: models, their versions and aliases, and the
metrics the job that made a version tagged on it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx

from leoclr_core import contract
from leoclr_core.settings import prepare_sqlite
from service.first_use import FIRST_USE

if TYPE_CHECKING:
    from mlflow.entities import Run

log = logging.getLogger(__name__)


class NotFound(LookupError):
    pass


class Unavailable(RuntimeError):
    """MLflow could not be read (unreachable, timed out, failing): the job is fine, its progress unknown."""


# MLflow's HTTP client waits 120 s per request and retries 7 times with backoff (minutes in all): right
# for a training driver, which must not lose its metrics, wrong for an API read a user waits on. The
# API process reads with these instead (MLflow reads them from the environment on each request), unless
# they were set explicitly.
API_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
# A search's metric (TuneSpec.metric, what Tune ranks by) -> its key in a trial's MLflow run.
RUN_METRIC = {"loss": contract.M_EPOCH_LOSS, "knn_top1": contract.M_KNN}
# How often, and how patiently, the admission gate asks a tracking server whether it answers.
SERVER_CHECK_S, SERVER_CHECK_TIMEOUT_S = 2.0, 3.0


@contextmanager
def _reading(what: str) -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"no {what}") from None
        log.warning("MLflow read of %s failed: %s", what, exc)
        raise Unavailable(f"MLflow at the tracking URI could not be read: {exc.message}") from None


def _num(metrics: dict[str, float], key: str, cast: type = float) -> Any:
    v = metrics.get(key)
    return None if v is None else cast(v)


class Tracking:
    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        prepare_sqlite(tracking_uri)
        if tracking_uri.startswith(("http://", "https://")):
            for k, v in API_HTTP_ENV.items():
                os.environ.setdefault(k, v)
            # a progress bar per result downloaded through the server, in the service's log
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._runs: dict[str, str] = {}  # job id -> run id, found once
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ runs
    def run_of(self, job_id: str, experiment: str) -> Run | None:
        """The job's MLflow run (the experiment is the job's name), or None before its driver made one."""
        with self._lock:
            run_id = self._runs.get(job_id)
        if run_id is not None:
            return self.client.get_run(run_id)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        found = self.client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{contract.TAG_SERVICE_JOB}` = '{job_id}'", max_results=1)
        if not found:
            return None
        with self._lock:
            self._runs[job_id] = found[0].info.run_id
        return found[0]

    def result(self, job_id: str, experiment: str) -> dict[str, Any] | None:
        """A finished job's result, as its driver logged it (contract.RESULT_ARTIFACT); None when the
        job made no run or its run has no result (a driver that failed before the end)."""
        with _reading(f"MLflow run of job {job_id}"):
            run = self.run_of(job_id, experiment)
            if run is None:
                return None
            folder, name = os.path.split(contract.RESULT_ARTIFACT)
            if name not in {Path(f.path).name for f in self.client.list_artifacts(run.info.run_id, folder)}:
                return None
            with tempfile.TemporaryDirectory() as tmp:
                path = self.client.download_artifacts(run.info.run_id, contract.RESULT_ARTIFACT, tmp)
                return json.loads(Path(path).read_text())

    def progress(self, job_id: str, experiment: str, spec: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The job's progress, None before its driver made a run; Unavailable when MLflow cannot say."""
        with _reading(f"MLflow run of job {job_id}"):
            run = self.run_of(job_id, experiment)
            if run is None:
                return None
            out = self._progress(run)
            if (spec or {}).get("kind") == "tune":
                out["trials"] = self.trials(run, spec or {})
            return out

    def trials(self, parent: Run, spec: dict[str, Any]) -> dict[str, Any]:
        """A search's trials from its child runs: how many finished, run, were stopped early or
        failed, and the best so far by the search's metric."""
        metric = spec.get("metric", "knn_top1")
        mode = spec.get("mode") or ("max" if metric == "knn_top1" else "min")
        key = RUN_METRIC.get(metric, metric)
        children = self.client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            max_results=1000)
        counts = {"total": len(children), "finished": 0, "running": 0, "stopped_early": 0, "failed": 0}
        best = None
        for r in children:
            if r.data.tags.get(contract.TAG_STOPPED_EARLY) == "true":
                counts["stopped_early"] += 1
            elif r.info.status == "FINISHED":
                counts["finished"] += 1
            elif r.info.status in ("RUNNING", "SCHEDULED"):
                counts["running"] += 1
            else:
                counts["failed"] += 1
            value = r.data.metrics.get(key)
            if value is not None and (best is None or (value > best["value"] if mode == "max" else value < best["value"])):
                best = {"trial": r.data.tags.get(contract.TAG_TRIAL), "metric": metric, "value": value,
                        "mlflow_run_id": r.info.run_id,
                        "params": {p: r.data.params.get(p) for p in spec.get("space", {})}}
        return {**counts, "best": best}

    def _progress(self, run: Run) -> dict[str, Any]:
        m = run.data.metrics
        step, total = _num(m, contract.M_STEP, int), _num(m, contract.M_TOTAL, int)
        return {
            "epoch": _num(m, contract.M_EPOCH, int), "epochs": _num(m, contract.M_EPOCHS, int),
            "step": step, "total_steps": total,
            "fraction": round(step / total, 4) if step is not None and total else None,
            "instances_per_s": _num(m, contract.M_IPS) if contract.M_IPS in m else _num(m, contract.M_EPOCH_IPS),
            "eta_seconds": _num(m, contract.M_ETA),
            "loss": _num(m, contract.M_LOSS) if contract.M_LOSS in m else _num(m, contract.M_EPOCH_LOSS),
            "knn_top1": _num(m, contract.M_KNN),
            "metrics": {k: v for k, v in m.items() if not k.startswith((contract.TRAIN_PREFIX, contract.PROGRESS_PREFIX, contract.EPOCH_PREFIX))},
            "mlflow_run_id": run.info.run_id,
            "mlflow_run_url": contract.run_url(self.uri, run.info.experiment_id, run.info.run_id),
        }

    def history(self, job_id: str, experiment: str, keys: list[str] | None = None) -> dict[str, Any]:
        """Every logged value of the run's metrics (all of them, or `keys`), oldest first."""
        with _reading(f"MLflow run of job {job_id}"):
            return self._history(job_id, experiment, keys)

    def _history(self, job_id: str, experiment: str, keys: list[str] | None) -> dict[str, Any]:
        run = self.run_of(job_id, experiment)
        if run is None:
            raise NotFound(f"job {job_id} has no MLflow run yet")
        names = keys or sorted(run.data.metrics)
        unknown = [k for k in names if k not in run.data.metrics]
        if unknown:
            raise NotFound(f"no metric {unknown[0]!r} in run {run.info.run_id}; it has {sorted(run.data.metrics)}")
        out = {}
        for key in names:
            points = sorted(self.client.get_metric_history(run.info.run_id, key), key=lambda p: (p.step, p.timestamp))
            out[key] = [{"step": p.step, "value": p.value, "timestamp": p.timestamp} for p in points]
        return {"mlflow_run_id": run.info.run_id, "metrics": out}

    # ------------------------------------------------------------------ registry
    def _versions(self, name: str, aliases: dict[str, str]) -> list[dict[str, Any]]:
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():  # search_model_versions leaves a version's aliases out
            by_version.setdefault(version, []).append(alias)
        out = []
        for v in self.client.search_model_versions(f"name = '{_quote(name)}'"):
            tags = dict(v.tags or {})
            out.append({
                "version": str(v.version), "run_id": v.run_id, "status": v.status,
                "aliases": sorted(by_version.get(str(v.version), [])),
                "created_at": v.creation_timestamp, "job_id": tags.get(contract.TAG_SERVICE_JOB),
                "metrics": {k.removeprefix(contract.VERSION_METRIC_PREFIX): float(val) for k, val in tags.items()
                            if k.startswith(contract.VERSION_METRIC_PREFIX)},
                "evaluations": {k.removeprefix(contract.VERSION_EVAL_PREFIX): float(val) for k, val in tags.items()
                                if k.startswith(contract.VERSION_EVAL_PREFIX)},
                "uri": f"models:/{name}/{v.version}",
                "promotion": contract.promotion_from_tags(tags),
            })
        return sorted(out, key=lambda d: int(d["version"]), reverse=True)

    def model(self, name: str) -> dict[str, Any]:
        with _reading(f"registered model {name!r}"):
            rm = self.client.get_registered_model(name)
            aliases = {k: str(v) for k, v in (rm.aliases or {}).items()}
            return {"name": rm.name, "description": rm.description, "aliases": aliases,
                    "versions": self._versions(rm.name, aliases)}

    def models(self) -> list[dict[str, Any]]:
        with _reading("registered models"):
            names = [rm.name for rm in self.client.search_registered_models(order_by=["name ASC"])
                     if not rm.name.startswith(contract.PROMOTION_LOCK_PREFIX)]  # promotion locks, not models
        return [self.model(n) for n in names]

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, Any]:
        model = self.model(name)
        if version not in {v["version"] for v in model["versions"]}:
            raise NotFound(f"model {name!r} has no version {version}; it has "
                           f"{sorted(int(v['version']) for v in model['versions'])}")
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_registered_model_alias(name, alias, version)
        except MlflowException as exc:
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise Unavailable(f"MLflow could not set the alias: {exc.message}") from None
            raise ValueError(f"alias {alias!r}: {exc.message}") from None  # MLflow's rules: "latest", "v3" are reserved
        return self.model(name)


def shown_uri(uri: str) -> str:
    """`uri` without the user and password it may carry (https://user:secret@host): fit for errors and logs."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"***@{host}" + (f":{parts.port}" if parts.port else "")))


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


class LazyTracking:
    """The Tracking of a URI, made on first use: mlflow is imported then, not when the API starts."""

    def __init__(self, tracking_uri: str, made: Tracking | None = None):
        self.uri, self._tracking, self._lock = tracking_uri, made, threading.Lock()
        self._store_ready = threading.Event()
        self._preparing = False
        self._server_check: tuple[float, bool | str] = (-SERVER_CHECK_S, True)  # (when, answer)

    def store_ready(self) -> bool:
        """Whether jobs may start: a tracking database (SQLite, PostgreSQL) has its schema. Its first
        user creates the tables; two drivers starting at once on a fresh database both try, and one
        fails ("table ... already exists"). So the service creates it, once, before it hands the first
        job to Ray: on a thread started by the first call (this answers False meanwhile), so that
        neither the API's start nor a request waits for mlflow's import. A tracking server migrates
        its own database: nothing to prepare."""
        if self._store_ready.is_set() or self.uri.startswith(("http://", "https://", "databricks")):
            return True
        with self._lock:
            if not self._preparing:
                self._preparing = True
                threading.Thread(target=self._prepare_store, name="tracking-store", daemon=True).start()
        return False

    def jobs_may_start(self) -> bool | str:
        """What the admission gate asks before it hands jobs to Ray: True; False while the tracking
        database's schema is being prepared (store_ready); or, when the tracking server does not
        answer, why, for the waiting jobs' error. A driver started then could log nothing, and its job
        would fail once MLflow's retries ran out; so the job waits `queued`, kept in the store and
        saying why, and starts once the server answers (asked at most every SERVER_CHECK_S)."""
        if not self.store_ready():
            return False
        if not self.uri.startswith(("http://", "https://")):
            return True
        with self._lock:
            checked, answer = self._server_check
        if time.monotonic() - checked < SERVER_CHECK_S:
            return answer
        answer = self._server_answer()
        with self._lock:
            self._server_check = (time.monotonic(), answer)
        return answer

    def _server_answer(self) -> bool | str:
        where = f"the MLflow tracking server at {shown_uri(self.uri)}"
        try:  # MLflow's own probe, open without credentials; an auth proxy's 401/403 is still an answer
            status = httpx.get(f"{self.uri.rstrip('/')}/health", timeout=SERVER_CHECK_TIMEOUT_S).status_code
        except httpx.HTTPError as exc:
            return f"{where} does not answer ({type(exc).__name__}: {exc}); jobs start when it does"
        if status >= 500:
            return f"{where} answers HTTP {status} to /health; jobs start when it is healthy"
        return True

    def _prepare_store(self) -> None:
        try:
            self()
        except Exception as exc:  # noqa: BLE001 - the drivers report their own errors; jobs must not wait forever
            log.warning("preparing the tracking store at %s failed: %s", self.uri, exc)
        self._store_ready.set()

    def __call__(self) -> Tracking:
        if self._tracking is None:
            with FIRST_USE:  # mlflow's import and the store's first use, never beside Ray's (service/first_use.py)
                if self._tracking is None:
                    tracking = Tracking(self.uri)
                    if not self.uri.startswith(("http://", "https://", "databricks")):
                        try:
                            tracking.client.search_experiments(max_results=1)  # a database's first use creates its tables
                        except Exception as exc:  # noqa: BLE001 - reads say so themselves (Unavailable)
                            log.warning("the tracking store at %s could not be read: %s", self.uri, exc)
                    self._tracking = tracking
                    self._store_ready.set()
        return self._tracking

    def result(self, job: Any) -> dict[str, Any] | None:
        """A finished job's result (see Tracking.result); its experiment is the job's name."""
        return self().result(job.id, job.name)
