"""MLflow: one run per job, its metrics and checkpoints, the final encoder and the registry.

The MLflow contract (ARCHITECTURE.md): params = the flattened spec; metrics per step
(`train/...`, x-axis = global step) and per epoch (`epoch/...`, `knn_top1`, `skipped_files`,
x-axis = epoch); checkpoints as artifacts; the backbone logged with `mlflow.pytorch.log_model`
(signature: float image batch in [0, 1] -> embedding) and registered with the spec's alias.
Only rank 0 logs. Everything goes through an explicit `MlflowClient`, never the fluent API's
global "active run", so that a Ray worker and its driver can log to the same run safely.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.tracking import MlflowClient

from leoclr_core import contract
from leoclr_core.contract import TAG_JOB, TAG_KIND, TAG_STORAGE
from leoclr_core.nn.model import ImageEncoder
from leoclr_core.settings import CoreSettings, core_settings, prepare_sqlite
from leoclr_core.spec.models import DataSpec, EvalSpec, ModelSpec, PromoteSpec, RegisterSpec, flatten
from leoclr_core.training.callbacks import Callbacks, RunState

log = logging.getLogger(__name__)

ENCODER_ARTIFACT = "encoder"


def client(settings: CoreSettings | None = None) -> MlflowClient:
    uri = (settings or core_settings()).tracking_uri
    prepare_sqlite(uri)
    mlflow.set_tracking_uri(uri)  # mlflow.pytorch.load_model and the registry read it
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(c: MlflowClient, name: str, settings: CoreSettings | None = None) -> str:
    """The experiment's id, created on first use. On a local store its artifacts go under the data
    directory (MLflow's own default is ./mlruns of whatever folder the process started in)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    s = settings or core_settings()
    location = None
    if s.tracking_uri.startswith("sqlite:"):
        root = s.artifact_root / name
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _log_params(c: MlflowClient, run_id: str, spec: Any) -> None:
    """The flattened spec as params; MLflow takes at most 100 per batch and 6000 characters a value."""
    params = [Param(k, str(v)[:6000]) for k, v in flatten(spec).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i:i + 100])


def latest_job_run(spec: Any, storage: str, *, settings: CoreSettings | None = None,
                   experiment: str | None = None) -> Run | None:
    """The newest MLflow run of job `spec.name` with Ray storage path `storage` in this tracking
    store (None: none here), whatever its status."""
    c = client(settings)
    exp = c.get_experiment_by_name(experiment or spec.name)
    if exp is None:
        return None
    found = c.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{TAG_JOB}` = '{spec.name}' and tags.`{TAG_STORAGE}` = '{storage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def is_finished(run: Run | None) -> bool:
    return run is not None and run.info.status == RunStatus.to_string(RunStatus.FINISHED)


def claim_run(run_id: str, settings: CoreSettings | None = None) -> None:
    """Tag a run that a resubmitted job continues, or returns as its result, with the service's new
    job id, so that the service finds it by that id."""
    c = client(settings)
    for k, v in _service_tags().items():
        c.set_tag(run_id, k, v)


def start_job_run(spec: Any, storage: str, *, settings: CoreSettings | None = None,
                  extra_tags: dict[str, str] | None = None, experiment: str | None = None) -> str:
    """The MLflow run of a pretrain (or tune) job: the unfinished run of the same job name and
    storage path when the job resumes (so a resumed job continues its run), else a new one with the
    spec as params. `experiment`: default the job's name (a search's trials go into the search's).
    (A job whose run FINISHED is not run again by its driver: it returns that run's result.)"""
    c = client(settings)
    exp = ensure_experiment(c, experiment or spec.name, settings)
    resume = getattr(getattr(spec, "checkpoint", None), "resume", True)
    if resume:
        found = latest_job_run(spec, storage, settings=settings, experiment=experiment)
        if found is not None and not is_finished(found):
            run_id = found.info.run_id
            c.update_run(run_id, status="RUNNING")
            claim_run(run_id, settings)
            return run_id
    tags = {TAG_JOB: spec.name, TAG_KIND: spec.kind, TAG_STORAGE: storage, **_service_tags(), **(extra_tags or {})}
    run = c.create_run(exp, run_name=spec.name, tags=tags)
    _log_params(c, run.info.run_id, spec)
    return run.info.run_id


def _service_tags() -> dict[str, str]:
    """The service's job id, when this driver is a service job, so the API can find the run.
    (A search's trials run in Tune's actors with the job's environment; they drop the variable.)"""
    job = os.environ.get(contract.ENV_JOB_ID)
    return {contract.TAG_SERVICE_JOB: job} if job else {}


def end_run(run_id: str, status: str = "FINISHED", settings: CoreSettings | None = None) -> None:
    """`status`: FINISHED, FAILED or KILLED (a cancelled job). A run something else has closed
    keeps its status: a search trial ASHA stopped is closed as KILLED by the search's driver, and
    the trial's own ending, which sees only an interrupted fit, can come after it."""
    c = client(settings)
    if c.get_run(run_id).info.status == "RUNNING":
        c.set_terminated(run_id, status)


def _metric_key(name: str) -> str:
    return name.replace("%", "pct")


def metrics_of(values: dict[str, Any], step: int, prefix: str = "") -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(_metric_key(f"{prefix}{k}"), float(v), now, int(step)) for k, v in contract.numbers(values).items()]


def log_metrics(c: MlflowClient, run_id: str, values: dict[str, Any], step: int, prefix: str = "") -> None:
    metrics = metrics_of(values, step, prefix)
    if metrics:
        c.log_batch(run_id, metrics=metrics)


# Answers that refuse a request (it would be refused again): anything else is the store being away.
_REFUSALS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE",
             "PERMISSION_DENIED", "UNAUTHENTICATED"}


def _refused(exc: Exception) -> bool:
    return isinstance(exc, mlflow.exceptions.MlflowException) and exc.error_code in _REFUSALS


class MlflowCallbacks(Callbacks):
    """Streams a run's records into its MLflow run (used on rank 0, in-process or in a Ray worker)."""

    STEP_KEYS = ("loss", "lr", "momentum", "instances_per_s")
    EPOCH_SKIP = ("type", "epoch", "step")
    # A tracking hiccup (a locked SQLite file, a restarting server) must not kill a training run, nor
    # hold it up: with a server away every call waits out the client's retries and timeouts (tens of
    # seconds with the service's settings), and a run logs several a second. So after a failed call
    # the calls of the next PAUSE_S seconds are not made: metrics wait in memory and go with the first
    # call after the pause that reaches the store, the run's history whole; a checkpoint upload in a
    # pause is skipped (the next one replaces it, and Ray Train's storage has them all).
    PAUSE_S = 10.0
    MAX_PENDING = 100_000  # metrics kept through an outage (a few MB); past it the oldest are dropped
    BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, run_id: str, *, log_checkpoints: bool = True, settings: CoreSettings | None = None):
        self.client, self.run_id, self.log_checkpoints = client(settings), run_id, log_checkpoints
        self.total = self.epochs = self.first_step = 0
        self.started = time.monotonic()
        self.pending: list[Metric] = []
        self.paused_until = 0.0
        self.dropped = 0

    def _failed(self, what: str, exc: Exception) -> None:
        if _refused(exc):  # sent again it would be refused again: logged, not kept, no pause
            log.warning("MLflow refused %s for run %s: %s", what, self.run_id, exc)
            return
        self.paused_until = time.monotonic() + self.PAUSE_S
        log.warning("MLflow %s failed for run %s: %s; tracking calls paused for %.0f s, metrics kept (%d waiting)",
                    what, self.run_id, exc, self.PAUSE_S, len(self.pending))

    def _paused(self, what: str) -> bool:
        if time.monotonic() < self.paused_until:
            log.debug("MLflow %s for run %s held: the store failed less than %.0f s ago", what, self.run_id,
                      self.PAUSE_S)
            return True
        return False

    def _safe(self, what: str, fn, *args) -> None:
        if self._paused(what):
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - logged and survived on purpose
            self._failed(what, exc)

    def _log(self, what: str, values: dict[str, Any], step: int, prefix: str = "", *, force: bool = False) -> None:
        self.pending += metrics_of(values, step, prefix)
        if len(self.pending) > self.MAX_PENDING:
            over = len(self.pending) - self.MAX_PENDING
            self.dropped += over
            del self.pending[:over]
            log.warning("MLflow away for run %s: %d of its oldest metrics dropped", self.run_id, self.dropped)
        if not force and self._paused(what):
            return
        while self.pending:
            batch = self.pending[:self.BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # noqa: BLE001 - logged and survived on purpose
                if _refused(exc):
                    del self.pending[:len(batch)]
                self._failed(what, exc)
                return
            del self.pending[:len(batch)]

    def on_start(self, state: RunState) -> None:
        self.epochs, self.total = state.epochs, state.epochs * state.steps_per_epoch
        self.first_step, self.started = state.start_epoch * state.steps_per_epoch, time.monotonic()
        progress = {contract.M_TOTAL: self.total, contract.M_EPOCHS: self.epochs, contract.M_STEP: self.first_step,
                    contract.M_EPOCH: state.start_epoch}
        self._log("progress", progress, self.first_step)

    def _progress(self, step: int, epoch: int) -> dict[str, float]:
        values = {contract.M_STEP: step, contract.M_EPOCH: epoch}
        done = step - self.first_step
        if self.total and done > 0:  # the rate of this (possibly resumed) attempt, start-up included
            values[contract.M_ETA] = (self.total - step) * (time.monotonic() - self.started) / done
        return values

    def on_log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        values = {f"{contract.TRAIN_PREFIX}{k}": record[k] for k in self.STEP_KEYS if k in record}
        values.update(self._progress(step, record.get("epoch", 0)))
        self._log("step metrics", values, step)

    def on_epoch(self, record: dict[str, Any], state: RunState) -> None:
        values = {k: v for k, v in record.items() if k not in self.EPOCH_SKIP}
        top = {k: values.pop(k) for k in list(values) if k.startswith(("knn", "linear")) or k == "skipped_files"}
        self.pending += metrics_of(values, record["epoch"], contract.EPOCH_PREFIX) + metrics_of(top, record["epoch"])
        # An epoch shorter than a log window has no step record: progress moves here too.
        self._log("epoch metrics", self._progress(record["step"], record["epoch"]), record["step"])

    def on_checkpoint(self, path: Path, epoch: int) -> None:
        """The newest checkpoint, overwritten in place: the run's artifacts stay the size of one
        checkpoint (Ray Train's storage keeps `checkpoint.keep` of them)."""
        if self.log_checkpoints:
            self._safe("checkpoint upload", self.client.log_artifact, self.run_id, str(path), "checkpoints/latest")
            self._safe("checkpoint tag", self.client.set_tag, self.run_id, contract.TAG_CHECKPOINT_EPOCH,
                       str(epoch))

    def on_end(self, state: RunState) -> None:
        """The metrics an outage held back, sent now whatever the pause: the run is about to close."""
        if self.pending:
            self._log("held-back metrics", {}, 0, force=True)


@dataclass
class RegisteredEncoder:
    model_uri: str  # runs:/<run>/encoder or models:/<id>
    name: str | None = None
    version: str | None = None
    alias: str | None = None

    @property
    def registry_uri(self) -> str | None:
        return f"models:/{self.name}@{self.alias}" if self.name and self.alias else None


def _code_path() -> str:
    return str(Path(__file__).resolve().parent)


def _requirements() -> list[str]:
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            "numpy", "pydantic>=2.6", "pyyaml"]


def log_encoder(
    run_id: str,
    backbone: torch.nn.Module,
    model: ModelSpec,
    data: DataSpec,
    register: RegisterSpec,
    *,
    metrics: dict[str, Any] | None = None,
    settings: CoreSettings | None = None,
) -> RegisteredEncoder:
    """Log the backbone as an `ImageEncoder` (normalisation inside) and register it with the alias.

    The model carries `leoclr_core` as code, so `mlflow.pytorch.load_model` works in a fresh
    process that has torch, torchvision, pydantic and pyyaml but not this project.
    """
    c = client(settings)
    done = registered_version(run_id, register, settings=settings)
    if done is not None and done.version is not None:
        # Logged and registered before, by a driver that died before it closed the run: the same
        # version, not a second one with the same weights.
        return _register(c, run_id, register, done.version, metrics or {})
    encoder = ImageEncoder(backbone.cpu().eval(), data.mean, data.std, data.image_size).eval()
    size = data.image_size
    example = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        embedding = encoder(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, embedding)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            encoder,
            name=ENCODER_ARTIFACT,
            signature=signature,
            input_example=example,
            # pickle, not torch.export's pt2: users get a real module back (fine-tunable, any image
            # size), and the code it needs travels with it.
            serialization_format="pickle",
            code_paths=[_code_path()],
            pip_requirements=_requirements(),
            metadata={"image_size": size, "mean": list(data.mean), "std": list(data.std),
                      "backbone": model.backbone, "input": "float32 (N, 3, H, W) in [0, 1]"},
            registered_model_name=register.model_name,
        )
    if not register.model_name:
        return RegisteredEncoder(model_uri=f"runs:/{run_id}/{ENCODER_ARTIFACT}")
    version = str(info.registered_model_version)
    c.update_model_version(
        register.model_name, version,
        description=(f"LeOCLR {model.backbone} encoder. Load with mlflow.pytorch.load_model("
                     f"'models:/{register.model_name}@{register.alias}'); input float32 (N, 3, {size}, {size}) "
                     "in [0, 1], output backbone features."),
    )
    return _register(c, run_id, register, version, metrics or {})


def _register(c: MlflowClient, run_id: str, register: RegisterSpec, version: str,
              metrics: dict[str, Any]) -> RegisteredEncoder:
    """Point the alias at `version` and tag it with the run's metrics, the run, and the job."""
    name = str(register.model_name)
    c.set_registered_model_alias(name, register.alias, version)
    tag_version(c, name, version, contract.VERSION_METRIC_PREFIX, metrics,
                {contract.TAG_RUN_ID: run_id, **_service_tags()})
    return RegisteredEncoder(f"runs:/{run_id}/{ENCODER_ARTIFACT}", name, version, register.alias)


def tag_version(c: MlflowClient, name: str, version: str, prefix: str, metrics: dict[str, Any],
                extra: dict[str, str] | None = None) -> None:
    """Tag a model version with each number of `metrics` as `<prefix><key>` (contract's version
    tags), and with `extra` as it is."""
    tags = {f"{prefix}{k}": str(v) for k, v in contract.numbers(metrics).items()}
    for k, v in {**tags, **(extra or {})}.items():
        c.set_model_version_tag(name, version, k, v)


def register_logged_encoder(run_id: str, register: RegisterSpec, metrics: dict[str, Any],
                            settings: CoreSettings | None = None) -> RegisteredEncoder:
    """Register the encoder a run already logged (a search's best trial) under `register`, with the
    alias, its metrics as version tags, and the job that asked for it. A run registered before
    keeps its version: no second version of the same encoder."""
    c = client(settings)
    if not register.model_name:
        return RegisteredEncoder(model_uri=f"runs:/{run_id}/{ENCODER_ARTIFACT}")
    done = registered_version(run_id, register, settings=settings)
    version = done.version if done is not None and done.version else str(
        mlflow.register_model(f"runs:/{run_id}/{ENCODER_ARTIFACT}", register.model_name).version)
    return _register(c, run_id, register, version, metrics)


def registered_version(run_id: str, register: RegisterSpec,
                       settings: CoreSettings | None = None) -> RegisteredEncoder | None:
    """What a finished job registered from run `run_id` (read only): its first version of
    `register.model_name`, with the alias only while the alias still points at it (someone may
    have moved it since). None: nothing registered from that run. A spec without a model name:
    the run's logged encoder."""
    source = f"runs:/{run_id}/{ENCODER_ARTIFACT}"
    if not register.model_name:
        return RegisteredEncoder(model_uri=source)
    c = client(settings)
    versions = c.search_model_versions(f"name = '{register.model_name}' and run_id = '{run_id}'")
    if not versions:
        return None
    version = str(min(int(v.version) for v in versions))
    try:
        aliased = str(c.get_model_version_by_alias(register.model_name, register.alias).version)
    except mlflow.exceptions.MlflowException:  # no such alias (any more)
        aliased = None
    return RegisteredEncoder(source, register.model_name, version, register.alias if aliased == version else None)


def resolve_version(uri: str, settings: CoreSettings | None = None) -> tuple[str, str] | None:
    """(name, version) of a `models:/name@alias` or `models:/name/version` URI; None for others."""
    if not uri.startswith("models:/"):
        return None
    c = client(settings)
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = c.get_model_version_by_alias(name, alias)
        return name, str(mv.version)
    if "/" in rest:
        name, version = rest.split("/", 1)
        return name, version
    return None


def load_encoder(uri: str, settings: CoreSettings | None = None) -> ImageEncoder:
    """An `ImageEncoder` from `models:/name@alias`, `models:/name/version` or `runs:/<id>/encoder`."""
    client(settings)
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"cannot load encoder {uri!r} from {(settings or core_settings()).tracking_uri}: "
                         f"{exc.message}") from None
    if not isinstance(model, ImageEncoder):
        raise ValueError(f"{uri} is a {type(model).__name__}, not an encoder logged by leoclr")
    return model.eval()


def log_evaluation(spec_name: str, spec: Any, results: dict[str, Any], encoder_uri: str,
                   settings: CoreSettings | None = None) -> str:
    """An MLflow run for an evaluate job (params: its spec; metrics: its results); the model version
    it evaluated, if any, is tagged with the results (`eval.<job>.<metric>`)."""
    c = client(settings)
    exp = ensure_experiment(c, spec_name, settings)
    run = c.create_run(exp, run_name=spec_name, tags={TAG_JOB: spec_name, TAG_KIND: "evaluate",
                                                       contract.TAG_ENCODER: encoder_uri, **_service_tags()})
    _log_params(c, run.info.run_id, spec)
    log_metrics(c, run.info.run_id, results, step=0)
    version = resolve_version(encoder_uri, settings)
    if version is not None:
        tag_version(c, *version, f"{contract.VERSION_EVAL_PREFIX}{spec_name}.", results)
    c.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def log_result(run_id: str, result: dict[str, Any], settings: CoreSettings | None = None) -> None:
    """A finished job's result as a JSON artifact of its run (contract.RESULT_ARTIFACT): where the
    service reads it, so a result never depends on the driver's log."""
    client(settings).log_dict(run_id, result, contract.RESULT_ARTIFACT)


# ---------------------------------------------------------------- promotion by evaluation
# The registry lock's tags: who holds it, and for how long from its creation (its lease).
LOCK_OWNER_TAG, LOCK_LEASE_TAG = "leoclr.lock.owner", "leoclr.lock.lease_s"
LOCK_LEASE_S = 60.0  # the section it guards is a few registry writes; a holder that dies is outlived by this
LOCK_WAIT_S = 600.0  # waiting longer means a lock that is renewed or never released: said, not waited out
PROMOTION_ATTEMPTS = 20  # times the holder may change while a candidate measures it before it gives up


@dataclass
class PromotionDecision:
    """One decision: whether `alias` of `model_name` moved to `version`, with both numbers."""

    model_name: str
    version: str
    alias: str
    metric: str
    decision: str  # contract.PROMOTED, KEPT or FIRST
    candidate: float
    holder: float | None  # the value of the version that held the alias, on the same data
    holder_version: str | None
    at: str
    data: str | None = None  # fingerprint of the evaluation data both values were measured on
    min_delta: float = 0.0
    mode: str = "max"

    @property
    def moved(self) -> bool:
        return self.decision in (contract.PROMOTED, contract.FIRST)

    @property
    def reason(self) -> str:
        if self.decision == contract.FIRST:
            return f"version {self.version} is the first to hold @{self.alias} ({self.metric} {self.candidate:g})"
        verb = "beats" if self.decision == contract.PROMOTED else "does not beat"
        return (f"version {self.version} ({self.metric} {self.candidate:g}) {verb} version {self.holder_version} "
                f"({self.holder:g}) by {self.min_delta:g} ({self.mode}): @{self.alias} "
                f"{'moves to' if self.moved else 'stays on'} version "
                f"{self.version if self.moved else self.holder_version}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reason": self.reason}


def eval_fingerprint(data: DataSpec, evaluation: EvalSpec, metric: str) -> str:
    """What makes two values of `metric` comparable: the evaluation data and the protocol measuring
    it (k-NN's k and temperature; the probe's epochs and learning rate for linear_top1; every setting
    of the fine-tuning, its label fraction first, for finetune_top1)."""
    protocol: dict[str, Any] = {"knn_k": evaluation.knn_k, "knn_temperature": evaluation.knn_temperature}
    if metric == "linear_top1":
        protocol.update(probe_epochs=evaluation.probe_epochs, probe_lr=evaluation.probe_lr)
    if metric.startswith("finetune_"):
        protocol["finetune"] = evaluation.finetune.model_dump(mode="json")
    blob = json.dumps({"data": data.model_dump(mode="json"), "metric": metric, **protocol}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _score_tag(fingerprint: str, metric: str) -> str:
    return f"{contract.PROMOTION_SCORE_PREFIX}{fingerprint}.{metric}"


def stored_score(c: MlflowClient, name: str, version: str, fingerprint: str, metric: str) -> float | None:
    """`metric` of a version measured before on the evaluation data of `fingerprint`, if it was."""
    value = (c.get_model_version(name, version).tags or {}).get(_score_tag(fingerprint, metric))
    return float(value) if value is not None else None


def alias_holder(c: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(c.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def promotion_of(name: str, version: str, settings: CoreSettings | None = None) -> dict[str, Any] | None:
    """The promotion decision recorded on a version (contract.promotion_from_tags), or None."""
    return contract.promotion_from_tags(dict(client(settings).get_model_version(name, version).tags or {}))


class RegistryLock:
    """A lock the registry itself provides: a registered model named `PROMOTION_LOCK_PREFIX<model>`,
    created by its holder (create-if-absent is atomic: the name is unique) and deleted on release.

    Its lease (`lease_s` from its creation, stamped by the store) bounds how long a holder that died
    keeps it: a waiter who finds it older breaks it. Breaking is itself exclusive: the breaker first
    creates `<lock>.broken-<owner>`, which only one waiter can, so two waiters never both delete the
    lock (one of them would delete the lock the other just took). Those tombstones stay (one per
    broken lock, hidden like the lock). A holder past its lease neither writes nor releases: its lock
    may be someone else's by then. Leases assume the hosts' clocks agree to well within `lease_s`."""

    def __init__(self, c: MlflowClient, model_name: str, lease_s: float = LOCK_LEASE_S,
                 wait_s: float = LOCK_WAIT_S):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.c, self.lease_s, self.wait_s = c, lease_s, wait_s
        self.name = f"{contract.PROMOTION_LOCK_PREFIX}{model_name}"
        self.owner = uuid.uuid4().hex
        self.acquired: float | None = None

    @property
    def margin(self) -> float:
        """The part of the lease kept free for the writes after `valid()` said yes."""
        return self.lease_s / 4

    def valid(self) -> bool:
        return self.acquired is not None and time.monotonic() - self.acquired < self.lease_s - self.margin

    def __enter__(self) -> "RegistryLock":
        deadline, delay = time.monotonic() + self.wait_s, 0.02
        while True:
            started = time.monotonic()
            try:
                self.c.create_registered_model(
                    self.name, tags={LOCK_OWNER_TAG: self.owner, LOCK_LEASE_TAG: str(self.lease_s)},
                    description="leoclr promotion lock: deleted by its holder, broken after its lease")
                self.acquired = started
                return self
            except mlflow.exceptions.MlflowException as exc:
                # DOES_NOT_EXIST: MLflow's SQL store, refused by the unique name, reads the holder's
                # lock to say so, which its holder may have deleted in between: taken, then released.
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    raise
            self._break_if_stale()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the registry lock {self.name!r} was held for more than {self.wait_s:g} s "
                                   f"(lease {self.lease_s:g} s); delete that registered model if no job holds it")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)

    def _read(self) -> Any | None:
        try:
            return self.c.get_registered_model(self.name)
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _break_if_stale(self) -> None:
        lock = self._read()
        if lock is None:
            return
        tags = dict(lock.tags or {})
        owner = tags.get(LOCK_OWNER_TAG, "unknown")
        lease = float(tags.get(LOCK_LEASE_TAG, self.lease_s))
        age = time.time() - lock.creation_timestamp / 1000
        if age <= lease:
            return
        try:
            self.c.create_registered_model(f"{self.name}.broken-{owner}", tags={LOCK_OWNER_TAG: self.owner},
                                           description=f"tombstone: lock of {owner} broken after {age:.0f} s")
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                return  # another waiter is breaking it
            raise
        again = self._read()
        if again is not None and (again.tags or {}).get(LOCK_OWNER_TAG) == owner:
            self.c.delete_registered_model(self.name)
            log.warning("broke the registry lock %s of %s: held %.0f s, past its lease of %g s", self.name, owner,
                        age, lease)

    def __exit__(self, *exc: Any) -> None:
        if not self.valid():
            log.warning("the registry lock %s outlived its lease; left to be broken", self.name)
            return
        lock = self._read()
        if lock is not None and (lock.tags or {}).get(LOCK_OWNER_TAG) == self.owner:
            self.c.delete_registered_model(self.name)


def _beats(candidate: float, holder: float, promote: PromoteSpec) -> bool:
    """Strictly better, and by at least min_delta: a tie never moves the alias."""
    gain = candidate - holder if promote.mode == "max" else holder - candidate
    return gain > 0 and gain >= promote.min_delta


def promote(
    model_name: str,
    version: str,
    promote: PromoteSpec,
    candidate_value: float,
    holder_value_fn: Callable[[str], float],
    *,
    data_fingerprint: str | None = None,
    settings: CoreSettings | None = None,
    lease_s: float = LOCK_LEASE_S,
    wait_s: float = LOCK_WAIT_S,
) -> PromotionDecision:
    """Decide whether `promote.alias` moves to `version` (whose `promote.metric` is `candidate_value`):
    yes when no version holds it ("first") or when the candidate beats the holder's value on the
    same evaluation data by `min_delta` ("promoted"); else "kept". The decision and both numbers are
    tagged on `version` (contract's promotion tags).

    The holder's value: the score tagged on it for `data_fingerprint` (the same evaluation data),
    else `holder_value_fn(holder_version)`, whose answer is tagged on the holder for the next time.
    It is measured outside the registry lock (it can take minutes); inside, the holder is read
    again and, if it moved meanwhile, the new one is measured and the decision retried. So two
    decisions never both move the alias past each other: each compares against the holder it
    replaces, under the lock."""
    c = client(settings)
    name, version, candidate = str(model_name), str(version), float(candidate_value)
    values: dict[str, float] = {}

    def tag(v: str, key: str, value: str) -> None:
        c.set_model_version_tag(name, v, key, value)

    def value_of(v: str) -> float:
        if v not in values:
            found = stored_score(c, name, v, data_fingerprint, promote.metric) if data_fingerprint else None
            if found is None:
                found = float(holder_value_fn(v))
                if data_fingerprint:
                    tag(v, _score_tag(data_fingerprint, promote.metric), repr(found))
            values[v] = found
        return values[v]

    if data_fingerprint:
        tag(version, _score_tag(data_fingerprint, promote.metric), repr(candidate))
    for _ in range(PROMOTION_ATTEMPTS):
        holder = alias_holder(c, name, promote.alias)
        if holder == version:
            recorded = promotion_of(name, version, settings)
            log.info("version %s of %s already holds @%s: nothing to decide", version, name, promote.alias)
            return PromotionDecision(
                name, version, promote.alias, promote.metric, (recorded or {}).get("decision") or contract.KEPT,
                candidate, candidate, version, _now(), data_fingerprint, promote.min_delta, promote.mode)
        held = value_of(holder) if holder is not None else None
        with RegistryLock(c, name, lease_s, wait_s) as lock:
            if alias_holder(c, name, promote.alias) != holder:
                continue  # moved while the holder was measured: measure the new one
            if held is None:
                decision = contract.FIRST
            else:
                decision = contract.PROMOTED if _beats(candidate, held, promote) else contract.KEPT
            result = PromotionDecision(name, version, promote.alias, promote.metric, decision, candidate, held,
                                       holder, _now(), data_fingerprint, promote.min_delta, promote.mode)
            if not lock.valid():
                continue  # paused past the lease: the lock may be another's now; decide again
            if result.moved:
                c.set_registered_model_alias(name, promote.alias, version)
            for key, value in {
                contract.TAG_PROMOTION_ALIAS: promote.alias, contract.TAG_PROMOTION_METRIC: promote.metric,
                contract.TAG_PROMOTION_CANDIDATE: repr(candidate),
                contract.TAG_PROMOTION_HOLDER: "" if held is None else repr(held),
                contract.TAG_PROMOTION_HOLDER_VERSION: holder or "", contract.TAG_PROMOTION_AT: result.at,
                contract.TAG_PROMOTION_DATA: data_fingerprint or "", contract.TAG_PROMOTION_DECISION: decision,
            }.items():
                tag(version, key, value)
        log.info("promotion of %s: %s", name, result.reason)
        return result
    raise RuntimeError(f"@{promote.alias} of {name} moved {PROMOTION_ATTEMPTS} times while version {version} "
                       "was being compared with its holder; run the decision again (an evaluate job with promote)")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def log_artifact_file(run_id: str, path: str | Path, artifact_path: str,
                      settings: CoreSettings | None = None) -> None:
    """Upload one file (a neighbour sheet) into folder `artifact_path` of a run's artifacts."""
    client(settings).log_artifact(run_id, str(path), artifact_path)
