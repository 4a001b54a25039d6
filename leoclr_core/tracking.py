"""MLflow: one run per job, its metrics and checkpoints, the final encoder and the registry.

The MLflow contract (ARCHITECTURE.md): params = the flattened spec; metrics per step
(`train/...`, x-axis = global step) and per epoch (`epoch/...`, `knn_top1`, `skipped_files`,
x-axis = epoch); checkpoints as artifacts; the backbone logged with `mlflow.pytorch.log_model`
(signature: float image batch in [0, 1] -> embedding) and registered with the spec's alias.
Only rank 0 logs. Everything goes through an explicit `MlflowClient`, never the fluent API's
global "active run", so that a Ray worker and its driver can log to the same run safely.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.tracking import MlflowClient

from leoclr_core import contract
from leoclr_core.contract import TAG_JOB, TAG_KIND, TAG_STORAGE
from leoclr_core.nn.model import ImageEncoder
from leoclr_core.settings import CoreSettings, core_settings, prepare_sqlite
from leoclr_core.spec.models import DataSpec, ModelSpec, RegisterSpec, flatten
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


def log_metrics(c: MlflowClient, run_id: str, values: dict[str, Any], step: int, prefix: str = "") -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(_metric_key(f"{prefix}{k}"), float(v), now, int(step))
               for k, v in contract.numbers(values).items()]
    if metrics:
        c.log_batch(run_id, metrics=metrics)


class MlflowCallbacks(Callbacks):
    """Streams a run's records into its MLflow run (used on rank 0, in-process or in a Ray worker)."""

    STEP_KEYS = ("loss", "lr", "momentum", "instances_per_s")
    EPOCH_SKIP = ("type", "epoch", "step")

    def __init__(self, run_id: str, *, log_checkpoints: bool = True, settings: CoreSettings | None = None):
        self.client, self.run_id, self.log_checkpoints = client(settings), run_id, log_checkpoints
        self.total = self.epochs = self.first_step = 0
        self.started = time.monotonic()

    def _safe(self, what: str, fn, *args) -> None:
        # A tracking hiccup (a locked SQLite file, a restarting server) must not kill a training run.
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - logged and survived on purpose
            log.warning("MLflow %s failed for run %s: %s", what, self.run_id, exc)

    def on_start(self, state: RunState) -> None:
        self.epochs, self.total = state.epochs, state.epochs * state.steps_per_epoch
        self.first_step, self.started = state.start_epoch * state.steps_per_epoch, time.monotonic()
        progress = {contract.M_TOTAL: self.total, contract.M_EPOCHS: self.epochs, contract.M_STEP: self.first_step,
                    contract.M_EPOCH: state.start_epoch}
        self._safe("progress", log_metrics, self.client, self.run_id, progress, self.first_step)

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
        self._safe("step metrics", log_metrics, self.client, self.run_id, values, step)

    def on_epoch(self, record: dict[str, Any], state: RunState) -> None:
        values = {k: v for k, v in record.items() if k not in self.EPOCH_SKIP}
        top = {k: values.pop(k) for k in list(values) if k.startswith(("knn", "linear")) or k == "skipped_files"}
        self._safe("epoch metrics", log_metrics, self.client, self.run_id, values, record["epoch"],
                   contract.EPOCH_PREFIX)
        self._safe("eval metrics", log_metrics, self.client, self.run_id, top, record["epoch"])
        # An epoch shorter than a log window has no step record: progress moves here too.
        self._safe("progress", log_metrics, self.client, self.run_id, self._progress(record["step"], record["epoch"]),
                   record["step"])

    def on_checkpoint(self, path: Path, epoch: int) -> None:
        """The newest checkpoint, overwritten in place: the run's artifacts stay the size of one
        checkpoint (Ray Train's storage keeps `checkpoint.keep` of them)."""
        if self.log_checkpoints:
            self._safe("checkpoint upload", self.client.log_artifact, self.run_id, str(path), "checkpoints/latest")
            self._safe("checkpoint tag", self.client.set_tag, self.run_id, contract.TAG_CHECKPOINT_EPOCH,
                       str(epoch))


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
