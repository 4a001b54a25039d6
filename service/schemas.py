"""Request and response bodies of the REST API (explicit, versioned under /v1)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A registered model's name, as RegisterSpec (leoclr_core/spec/models.py) lets a job register it.
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
# A job's id: the store makes 32 hex digits; the pattern refuses what no id can be before the store sees it.
JOB_ID = r"^[A-Za-z0-9_-]{1,64}$"


class ValidationIssue(BaseModel):
    """One finding of FastAPI's request validation (a query or path parameter, a header)."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    """Every 4xx/5xx body: a sentence naming what is wrong, or FastAPI's list of validation findings."""

    detail: str | list[ValidationIssue]


# Why each error status is answered, as the OpenAPI document says it.
WHY = {400: "The body is not JSON text.", 401: "No bearer token, or the wrong one.", 404: "No such job or model.",
       409: "The job is in no state to do this.", 413: "The request body is over LEOCLR_MAX_BODY_BYTES.",
       422: "A parameter or the body is invalid; `detail` names it.",
       503: "A backend (Ray, MLflow) could not be reached."}


def errors(*codes: int, plain: bool = False) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each error status it can answer, all with the one JSON error body.
    `plain`: for a route whose answer is text, where FastAPI would file a `model` under text/plain."""
    if plain:  # ErrorOut is in the document's components: every other route names it as a model
        body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
        return {code: {"content": body, "description": WHY[code]} for code in codes}
    return {code: {"model": ErrorOut, "description": WHY[code]} for code in codes}


class ProbeOut(BaseModel):
    """A probe's answer."""

    status: str = Field(..., description="`ok` (alive) or `ready` (ready to run jobs).")


class Progress(BaseModel):
    """Where a job stands, from the metrics its rank-0 worker logs to MLflow."""

    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    total_steps: int | None = None
    fraction: float | None = None
    instances_per_s: float | None = None
    eta_seconds: float | None = None
    loss: float | None = None
    knn_top1: float | None = Field(None, description="Latest k-NN top-1 accuracy (%), if the job measures it.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Other latest metrics (evaluate results).")
    mlflow_run_id: str | None = None
    mlflow_run_url: str | None = None
    model_version: str | None = None
    model_uri: str | None = None
    trials: dict[str, Any] | None = Field(
        None, description="A search's trials: total, finished, running, stopped_early, failed, and the best so far.")


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    name: str
    status: str
    error: str | None = None
    result: dict[str, Any] | None = Field(
        None, description="A finished job's result (final metrics, registry URI), as its driver logged it to MLflow.")
    progress: Progress | None = None  # on GET /v1/jobs/{id}, once the job has an MLflow run
    created_at: datetime
    updated_at: datetime
    spec: dict[str, Any]
    tracking_error: str | None = Field(
        None, description="Why progress is missing when MLflow could not be read (unreachable, timed out).")

    @field_validator("created_at", "updated_at")
    @classmethod
    def _utc(cls, t: datetime) -> datetime:
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)  # SQLite gives naive datetimes back


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class MetricPoint(BaseModel):
    step: int
    value: float
    timestamp: int  # ms since the epoch


class MetricHistory(BaseModel):
    mlflow_run_id: str
    metrics: dict[str, list[MetricPoint]]


class Promotion(BaseModel):
    """The promotion decision made for a version (leoclr_core.tracking.promote), from its tags."""

    decision: str = Field(..., description="promoted, kept or first")
    alias: str | None = None
    metric: str | None = None
    candidate: float | None = Field(None, description="This version's value of the metric.")
    holder: float | None = Field(None, description="The value of the alias's holder, on the same data.")
    holder_version: str | None = None
    at: str | None = Field(None, description="When it was decided (ISO 8601, UTC).")
    data: str | None = Field(None, description="Fingerprint of the evaluation data both values were measured on.")


class ModelVersion(BaseModel):
    version: str
    uri: str
    run_id: str | None = None
    job_id: str | None = None
    status: str | None = None
    aliases: list[str] = []
    created_at: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="Final metrics of the job that made it.")
    evaluations: dict[str, float] = Field(default_factory=dict, description="<evaluate job>.<metric> results.")
    promotion: Promotion | None = Field(None, description="The promotion decision made for it; null: none.")


class Model(BaseModel):
    name: str
    description: str | None = None
    aliases: dict[str, str] = Field(default_factory=dict, description="alias -> version")
    versions: list[ModelVersion]


class ModelList(BaseModel):
    items: list[Model]


class AliasIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    version: str = Field(..., pattern=r"^[0-9]+$", max_length=12)
