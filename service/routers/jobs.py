"""Jobs: submitted as a typed spec, handed to Ray by the admission gate, read back with Ray's
status, MLflow's progress and the result the driver logged; their logs, metrics, and cancel."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, AsyncIterator, Callable, Coroutine, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from leoclr_core.spec.models import KINDS, JobSpec, SpecError, parse_spec

from service.auth import require_token
from service.deps import (FoundJob, Health, JobId, JobViews, MlflowTracking, OptionalAdmission, OptionalRunner,
                          Settings, Store, TrackingReader, Views, job_or_404)
from service.policy import PolicyError, check_spec
from service.reconcile import RayHealth, reconcile_job
from service.runner import Runner
from service.schemas import JobList, JobOut, MetricHistory, Progress, errors
from service.settings import ServiceSettings
from service.store import FINISHED, STATUSES, IdempotencyConflict, Job, JobStore
from service.tracking import LazyTracking, NotFound, Unavailable

# What the query parameters accept, in the OpenAPI document as well as in the code.
JobStatus = Literal[STATUSES]
JobKind = Literal[KINDS]
MAX_OFFSET = 2**31 - 1  # a page offset every database takes (SQLite overflows past 2**63 - 1)
SUBMIT = "submitJob"


class SpecRoute(APIRoute):
    """The submit route reads a spec without `kind` as a pretrain job, as `parse_spec` and the CLI
    do. The body's schema stays the plain discriminated union: a validator before the union would
    make FastAPI document the discriminator's mapping as nested unions, which no client reads."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        if self.operation_id != SUBMIT:
            return handle

        async def submit(request: Request) -> Response:
            return await handle(_PretrainByDefault(request.scope, request.receive))

        return submit


class _PretrainByDefault(Request):
    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            raw = await super().body()
            try:
                spec = json.loads(raw)
            except ValueError:  # FastAPI answers it as the JSON error it is
                spec = None
            if isinstance(spec, dict) and "kind" not in spec:
                raw = json.dumps({**spec, "kind": "pretrain"}).encode()
            self._body = raw
        return self._body


async def spec_errors(request: Request, exc: RequestValidationError) -> Response:
    """An invalid job spec is answered as `leoclr` reads one (parse_spec): one sentence per field,
    naming its path and why, the same on the CLI and over the API. Everything else (a body that is
    not a JSON object, a bad header or parameter) keeps FastAPI's list of findings."""
    route = request.scope.get("route")
    if (getattr(route, "operation_id", None) == SUBMIT and isinstance(exc.body, dict)
            and all(e["loc"][:1] == ("body",) for e in exc.errors())):
        try:
            parse_spec(exc.body)
        except SpecError as err:
            return JSONResponse({"detail": str(err)}, 422)
    return await request_validation_exception_handler(request, exc)


def _job_link(operation_id: str) -> dict[str, Any]:
    """An OpenAPI link from a created job to an operation on it (clients and fuzzers follow them)."""
    return {"operationId": operation_id, "parameters": {"job_id": "$response.body#/id"}}


CREATED_JOB_LINKS = {"GetJob": _job_link("getJob"), "CancelJob": _job_link("cancelJob"),
                     "GetJobLogs": _job_link("getJobLogs"), "GetJobMetrics": _job_link("getJobMetrics")}

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_token)], route_class=SpecRoute)


@router.post("", status_code=status.HTTP_201_CREATED, operation_id=SUBMIT, response_model=JobOut,
             responses={201: {"links": CREATED_JOB_LINKS},
                        200: {"model": JobOut, "description": "The job this Idempotency-Key already created."},
                        **errors(400, 401, 413, 422)})
def submit_job(spec: JobSpec, settings: Settings, store: Store, runner: OptionalRunner, admission: OptionalAdmission,
               health: Health, idempotency_key: Annotated[str | None, Header(max_length=128)] = None) -> Any:
    """Store the job, then hand it to Ray when the cluster has room (it waits `queued` until then)."""
    try:
        check_spec(spec, settings.allowed_data_roots, settings.home)
    except PolicyError as exc:
        raise HTTPException(422, str(exc)) from None
    reason = admission.refusal(spec) if admission is not None else None
    if reason is not None:  # it would wait for ever: say so now, naming the fields
        raise HTTPException(422, f"cannot run on this cluster: {reason}")
    try:
        job, created = store.create(spec.kind, spec.name, spec.model_dump(mode="json"), idempotency_key)
    except IdempotencyConflict as exc:  # the IETF idempotency-key draft: a reused key with another body
        raise HTTPException(422, str(exc)) from None
    if not created:
        return JSONResponse(JobOut.model_validate(job).model_dump(mode="json"), status.HTTP_200_OK)
    if runner is None or admission is None:
        return store.update(job.id, status="failed", error="no Ray cluster is configured for this service")
    admission.admit(store, health.down_since is None)
    return store.get(job.id)


@router.get("", operation_id="listJobs", response_model=JobList, responses=errors(401, 422))
def list_jobs(store: Store, status_: Annotated[JobStatus | None, Query(alias="status")] = None,
              kind: JobKind | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Any:
    rows, total = store.list(status_, kind, limit, offset)
    return {"items": rows, "total": total, "limit": limit, "offset": offset}


@router.get("/{job_id}", operation_id="getJob", response_model=JobOut, responses=errors(401, 404, 422))
async def get_job(job_id: JobId, views: Views, store: Store, runner: OptionalRunner, health: Health,
                  settings: Settings, tracking: TrackingReader) -> Any:
    """The job with Ray's status, MLflow's progress and, once finished, its result."""
    # A finished job never changes again (nothing moves a job out of FINISHED), so its view is
    # kept rendered: reading it is a dictionary lookup here, with no thread, database or MLflow.
    done = views.finished.get(job_id)
    if done is not None:
        return Response(done, media_type="application/json")
    return await run_in_threadpool(_view, job_id, views, store, runner, health, settings, tracking)


def _view(job_id: str, views: JobViews, store: JobStore, runner: Runner | None, health: RayHealth,
          settings: ServiceSettings, tracking: LazyTracking) -> Any:
    # An unfinished job's view (Ray's status, MLflow's progress) is built at most once per
    # fresh_s: dashboards polling it then cost a dictionary read, not two remote calls.
    recent = views.recent(job_id)
    if recent is not None:
        return recent
    job = job_or_404(store, job_id)
    if job.status not in FINISHED and runner is not None:
        job = reconcile_job(store, runner, job, health, settings.ray_lost_after_s, tracking.result)  # Ray's view
    out = JobOut.model_validate(job)
    try:
        if job.status in FINISHED and job.submission_id and job.result is None:
            # MLflow could not give the result when the job finished: it may now
            out.result = tracking.result(job)
            if out.result is not None:
                job = store.update(job.id, result=out.result)
        progress = _progress(views, tracking, job)
    except Unavailable as exc:  # the job is still there: say why its progress is not
        progress, out.tracking_error = None, str(exc)
    out.progress = Progress(**progress) if progress is not None else None
    if job.status not in FINISHED:
        views.fresh[job_id] = (time.monotonic(), out)
        return out
    views.fresh.pop(job_id, None)
    body = out.model_dump_json().encode()
    if out.tracking_error is None:  # with MLflow back, what it could not give will be there
        views.finished.put(job_id, body)
    return Response(body, media_type="application/json")


def _progress(views: JobViews, tracking: LazyTracking, job: Job) -> dict[str, Any] | None:
    if job.id in views.final_progress:
        return views.final_progress[job.id]
    progress = tracking().progress(job.id, job.name, job.spec)
    if progress is not None and job.result and job.result.get("model_version"):
        progress["model_version"] = job.result["model_version"]
        progress["model_uri"] = job.result.get("registry_uri")
    if job.status in FINISHED:  # its driver has ended: nothing more reaches its run, or makes one
        views.final_progress[job.id] = progress
    return progress


@router.get("/{job_id}/metrics", operation_id="getJobMetrics", response_model=MetricHistory,
            responses=errors(401, 404, 422, 503))
def get_job_metrics(job: FoundJob, tracking: MlflowTracking,
                    key: Annotated[list[str] | None, Query()] = None) -> Any:
    """Every logged value of the job's metrics (all of them, or each `key`), oldest first."""
    try:
        return tracking.history(job.id, job.name, key)
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except Unavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None


@router.get("/{job_id}/logs", operation_id="getJobLogs", response_class=PlainTextResponse,
            responses=errors(401, 404, 409, 422, 503, plain=True))
async def get_job_logs(job: FoundJob, runner: OptionalRunner, follow: bool = False,
                       tail: Annotated[int, Query(ge=1, le=100_000)] = 1000) -> Response:
    """The driver's log: its last `tail` lines, or with follow=true a stream until the job ends."""
    if not job.submission_id or runner is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} has not reached Ray yet (status {job.status})")
    submission_id = job.submission_id
    if follow:
        async def stream() -> AsyncIterator[str]:
            try:
                async for chunk in runner.tail(submission_id):
                    yield chunk
            except Exception as exc:  # noqa: BLE001 - the stream is open: say it in-band
                yield f"\n[leoclr] log stream ended: {exc}\n"
        return StreamingResponse(stream(), media_type="text/plain")
    try:
        text = await run_in_threadpool(runner.logs, submission_id)
    except Exception as exc:  # noqa: BLE001 - Ray is down or forgot the job: a clear 503
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Ray could not give the log: {exc}") from None
    return PlainTextResponse("".join(text.splitlines(keepends=True)[-tail:]))


@router.post("/{job_id}/cancel", operation_id="cancelJob", response_model=JobOut,
             responses=errors(401, 404, 409, 422, 503))
def cancel_job(job: FoundJob, store: Store, runner: OptionalRunner, admission: OptionalAdmission,
               views: Views, tracking: TrackingReader) -> Any:
    """Stop the job: a job still queued in the service never reaches Ray; one on Ray is stopped there."""
    if job.status in FINISHED:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} already {job.status}")
    cancelled = None
    if not job.submission_id and admission is not None:
        with admission.lock:  # not handed to Ray while it is cancelled here
            if not job_or_404(store, job.id).submission_id:
                cancelled = store.finish(job.id, "cancelled")
        job = job_or_404(store, job.id)
    if cancelled is None and job.status not in FINISHED:
        if job.submission_id and runner is not None:
            try:
                stopped = runner.stop(job.submission_id)
            except Exception as exc:  # noqa: BLE001 - Ray unreachable: the job may still run there
                raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                    f"Ray could not be asked to stop the job: {exc}") from None
            if not stopped:
                job = reconcile_job(store, runner, job, read_result=tracking.result)  # Ray says it had already ended
                if job.status in FINISHED:
                    raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} already {job.status}")
        cancelled = store.finish(job.id, "cancelled")  # one of racing cancels wins; the others see it finished
    views.fresh.pop(job.id, None)
    if cancelled is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} already {job_or_404(store, job.id).status}")
    return cancelled
