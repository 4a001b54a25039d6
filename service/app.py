"""The FastAPI app: thin routes over the job store, the runner (Ray Jobs) and MLflow."""

from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request, status
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from leoclr_core.spec.models import KINDS, JobSpec, SpecError, parse_spec

from service.auth import BearerAuth, ensure_token, require_token
from service.policy import PolicyError, check_spec
from service.admission import Admission
from service.reconcile import RayHealth, Reconciler, reconcile_job
from service.runner import Runner
from service.schemas import (JOB_ID, MODEL_NAME, AliasIn, ErrorOut, JobList, JobOut, MetricHistory, Model, ModelList,
                      Progress)
from service.settings import ServiceSettings
from service.store import FINISHED, STATUSES, IdempotencyConflict, Job, JobStore
from service.tracking import NotFound, Tracking, Unavailable

# What the query and path parameters accept, in the OpenAPI document as well as in the code.
JobStatus = Literal[STATUSES]
JobKind = Literal[KINDS]
JobId = Annotated[str, Path(pattern=JOB_ID, description="A job's id, as POST /v1/jobs returned it.")]
ModelName = Annotated[str, Path(pattern=MODEL_NAME, description="A registered model's name.")]
FINISHED_VIEWS = 4096  # finished jobs whose rendered view is kept (a few KB each)
MAX_OFFSET = 2**31 - 1  # a page offset every database takes (SQLite overflows past 2**63 - 1)

_WHY = {400: "The body is not JSON text.", 401: "No bearer token, or the wrong one.", 404: "No such job or model.",
        409: "The job is in no state to do this.", 413: "The request body is over LEOCLR_MAX_BODY_BYTES.",
        422: "A parameter or the body is invalid; `detail` names it.",
        503: "A backend (Ray, MLflow) could not be reached."}


def _job_link(path: str, method: str = "get") -> dict[str, Any]:
    """An OpenAPI link from a created job to an operation on it (clients and fuzzers follow them)."""
    ref = "#/paths/" + path.replace("/", "~1") + f"/{method}"
    return {"operationRef": ref, "parameters": {"job_id": "$response.body#/id"}}


CREATED_JOB_LINKS = {
    "GetJob": _job_link("/v1/jobs/{job_id}"), "CancelJob": _job_link("/v1/jobs/{job_id}/cancel", "post"),
    "GetJobLogs": _job_link("/v1/jobs/{job_id}/logs"), "GetJobMetrics": _job_link("/v1/jobs/{job_id}/metrics"),
}


def _errors(*codes: int, plain: bool = False) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each error status it can answer, all with the one JSON error body.
    `plain`: for a route whose answer is text, where FastAPI would file a `model` under text/plain."""
    if plain:  # ErrorOut is in the document's components: every other route names it as a model
        body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
        return {code: {"content": body, "description": _WHY[code]} for code in codes}
    return {code: {"model": ErrorOut, "description": _WHY[code]} for code in codes}


class BodyLimit:
    """Refuses a body over the limit: by its Content-Length before reading, or once the bytes
    read pass it (a chunked upload has no length). A plain ASGI middleware, so it sees the stream."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        await JSONResponse({"detail": f"request body over {self.limit} bytes"}, 413)(scope, receive, send)


def _document_job_specs(app: FastAPI) -> None:
    """POST /v1/jobs reads its body itself (parse_spec: errors name the field, then the data-root
    policy), so FastAPI would document it as any object; the document says what it takes instead:
    the job spec union, every field of every kind."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()  # FastAPI keeps this dict as app.openapi_schema
            schemas = doc["components"]["schemas"]
            spec = TypeAdapter(JobSpec).json_schema(ref_template="#/components/schemas/{model}")
            for name, schema in {**spec.pop("$defs"), "JobSpec": spec}.items():
                if name in schemas:
                    raise RuntimeError(f"the spec model {name} would overwrite a schema of the same name")
                schemas[name] = schema
            doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] = {
                "$ref": "#/components/schemas/JobSpec"}
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class Measure:
    """Counts requests and their latency by method, route template (bounded labels) and status. A
    plain ASGI middleware: `@app.middleware("http")` runs every request through an extra task and
    memory streams, which cost more than the read it measures."""

    def __init__(self, app: Any, requests: Counter, latency: Histogram):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        code = 500  # what the client gets if the app raises before it answers

        async def send_status(message: Any) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            self.requests.labels(scope["method"], route, str(code)).inc()


class RenderedViews:
    """Rendered answers by key, at most `size` of them (the oldest go first). Read from the event
    loop while worker threads add to it: a dict's get is atomic, additions take the lock."""

    def __init__(self, size: int):
        self.size, self.views, self.lock = size, {}, threading.Lock()

    def get(self, key: str) -> bytes | None:
        return self.views.get(key)

    def put(self, key: str, view: bytes) -> None:
        with self.lock:
            while len(self.views) >= self.size:
                del self.views[next(iter(self.views))]
            self.views[key] = view


class JobsCollector:
    """`leoclr_jobs{status,kind}`: read from the store when Prometheus scrapes, never kept twice."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self) -> Any:
        family = GaugeMetricFamily("leoclr_jobs", "Jobs in the store, by status and kind", labels=["status", "kind"])
        for (st, kind), n in self.store.counts().items():
            family.add_metric([st, kind], n)
        yield family


def create_app(settings: ServiceSettings | None = None, runner: Runner | None = None,
               reconcile_interval: float = 2.0, tracking: Tracking | None = None, fresh_s: float = 1.0) -> FastAPI:
    s = settings or ServiceSettings()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_cpu_seconds_total etc.: what the API costs (bench.api_load)
    requests = Counter("leoclr_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("leoclr_http_request_seconds", "HTTP request latency", ["method", "route"], registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = JobStore(s.job_database_url)
        app.state.token = ensure_token(s.api_token, s.token_file)
        app.state.runner = runner
        app.state.tracking = tracking or Tracking(s.tracking_uri)
        app.state.final_progress = {}  # job id -> progress of a finished job: it no longer changes
        app.state.fresh = {}  # job id -> (when, view) of an unfinished job, see get_job
        app.state.finished_views = RenderedViews(FINISHED_VIEWS)  # job id -> JSON of a finished job
        registry.register(JobsCollector(app.state.store))
        app.state.health = RayHealth()
        app.state.admission = None
        reconciler = None
        if runner is not None:
            app.state.admission = Admission(runner, s.max_running_jobs, s.max_resources)
            reconciler = Reconciler(app.state.store, runner, reconcile_interval, app.state.admission,
                                    s.ray_lost_after_s, app.state.health)
            reconciler.start()
        yield
        if reconciler is not None:
            reconciler.stop()

    app = FastAPI(title="LeOCLR training service", version="0.1.0", lifespan=lifespan)
    # The last added runs first: measure everything, then refuse a stranger before reading any body.
    app.add_middleware(BodyLimit, limit=s.max_body_bytes)
    app.add_middleware(BearerAuth)
    app.add_middleware(Measure, requests=requests, latency=latency)
    authed = [Depends(require_token)]
    _document_job_specs(app)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses=_errors(503))
    def readyz(request: Request) -> dict[str, str]:
        """Ready to run jobs: the job store answers, and so did the Ray Jobs API when last asked
        (every reconcile pass asks; before the first, this asks)."""
        try:
            request.app.state.store.list(limit=1)
        except Exception as exc:  # noqa: BLE001 - any database error: not ready, and why
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"the job store does not answer: {exc}") from None
        run: Runner | None = request.app.state.runner
        if run is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no Ray cluster is configured for this service")
        health: RayHealth = request.app.state.health
        if health.checked is None:
            health.check(run)
        if not health.ok:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                f"the Ray Jobs API does not answer (for {health.down_for():.0f} s): {health.error}")
        return {"status": "ready"}

    @app.get("/metrics", dependencies=authed, response_class=PlainTextResponse, responses=_errors(401, plain=True))
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ jobs
    @app.post("/v1/jobs", status_code=status.HTTP_201_CREATED, dependencies=authed, response_model=JobOut,
              responses={201: {"links": CREATED_JOB_LINKS},
                         200: {"model": JobOut, "description": "The job this Idempotency-Key already created."},
                         **_errors(400, 401, 413, 422)})
    def submit(request: Request, body: dict[str, Any],
               idempotency_key: Annotated[str | None, Header(max_length=128)] = None) -> Any:
        try:
            spec = parse_spec(body)
            check_spec(spec, s.allowed_data_roots, s.home)
        except (SpecError, PolicyError) as exc:
            raise HTTPException(422, str(exc)) from None
        admission: Admission | None = request.app.state.admission
        reason = admission.refusal(spec) if admission is not None else None
        if reason is not None:  # it would wait for ever: say so now, naming the fields
            raise HTTPException(422, f"cannot run on this cluster: {reason}")
        store: JobStore = request.app.state.store
        try:
            job, created = store.create(spec.kind, spec.name, spec.model_dump(mode="json"), idempotency_key)
        except IdempotencyConflict as exc:  # the IETF idempotency-key draft: a reused key with another body
            raise HTTPException(422, str(exc)) from None
        if not created:
            return JSONResponse(JobOut.model_validate(job).model_dump(mode="json"), status.HTTP_200_OK)
        run: Runner | None = request.app.state.runner
        if run is None:
            return store.update(job.id, status="failed", error="no Ray cluster is configured for this service")
        request.app.state.admission.admit(store, request.app.state.health.down_since is None)
        return store.get(job.id)

    @app.get("/v1/jobs", dependencies=authed, response_model=JobList, responses=_errors(401, 422))
    def list_jobs(request: Request, status_: Annotated[JobStatus | None, Query(alias="status")] = None,
                  kind: JobKind | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Any:
        rows, total = request.app.state.store.list(status_, kind, limit, offset)
        return {"items": rows, "total": total, "limit": limit, "offset": offset}

    def _job(request: Request, job_id: str) -> Job:
        job = request.app.state.store.get(job_id)
        if job is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
        return job

    def _progress(request: Request, job: Job) -> dict[str, Any] | None:
        cache = request.app.state.final_progress
        if job.id in cache:
            return cache[job.id]
        progress = request.app.state.tracking.progress(job.id, job.name, job.spec)
        if progress is not None and job.result and job.result.get("model_version"):
            progress["model_version"] = job.result["model_version"]
            progress["model_uri"] = job.result.get("registry_uri")
        if job.status in FINISHED:  # its driver has ended: nothing more reaches its run, or makes one
            cache[job.id] = progress
        return progress

    @app.get("/v1/jobs/{job_id}", dependencies=authed, response_model=JobOut, responses=_errors(401, 404, 422))
    async def get_job(request: Request, job_id: JobId) -> Any:
        # A finished job never changes again (nothing moves a job out of FINISHED), so its view is
        # kept rendered: reading it is a dictionary lookup here, with no thread, database or MLflow.
        done = request.app.state.finished_views.get(job_id)
        if done is not None:
            return Response(done, media_type="application/json")
        return await run_in_threadpool(_view, request, job_id)

    def _view(request: Request, job_id: str) -> Any:
        # An unfinished job's view (Ray's status, MLflow's progress) is built at most once per
        # fresh_s: dashboards polling it then cost a dictionary read, not two remote calls.
        fresh = request.app.state.fresh
        hit = fresh.get(job_id)
        if hit is not None and time.monotonic() - hit[0] < fresh_s:
            return hit[1]
        job = _job(request, job_id)
        run: Runner | None = request.app.state.runner
        if job.status not in FINISHED and run is not None:
            job = reconcile_job(request.app.state.store, run, job, request.app.state.health,
                                s.ray_lost_after_s)  # Ray's view, on read too
        out = JobOut.model_validate(job)
        try:
            progress = _progress(request, job)
        except Unavailable as exc:  # the job is still there: say why its progress is not
            progress, out.tracking_error = None, str(exc)
        out.progress = Progress(**progress) if progress is not None else None
        if job.status not in FINISHED:
            fresh[job_id] = (time.monotonic(), out)
            return out
        fresh.pop(job_id, None)
        body = out.model_dump_json().encode()
        if out.tracking_error is None:  # with MLflow back, the progress it could not give will be there
            request.app.state.finished_views.put(job_id, body)
        return Response(body, media_type="application/json")

    @app.get("/v1/jobs/{job_id}/metrics", dependencies=authed, response_model=MetricHistory,
             responses=_errors(401, 404, 422, 503))
    def job_metrics(request: Request, job_id: JobId, key: Annotated[list[str] | None, Query()] = None) -> Any:
        job = _job(request, job_id)
        try:
            return request.app.state.tracking.history(job.id, job.name, key)
        except NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except Unavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None

    @app.get("/v1/jobs/{job_id}/logs", dependencies=authed, response_class=PlainTextResponse,
             responses=_errors(401, 404, 409, 422, 503, plain=True))
    async def job_logs(request: Request, job_id: JobId, follow: bool = False,
                       tail: Annotated[int, Query(ge=1, le=100_000)] = 1000) -> Response:
        """The driver's log: its last `tail` lines, or with follow=true a stream until the job ends."""
        job = _job(request, job_id)
        run: Runner | None = request.app.state.runner
        if not job.submission_id or run is None:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} has not reached Ray yet (status {job.status})")
        if follow:
            async def stream() -> AsyncIterator[str]:
                try:
                    async for chunk in run.tail(job.submission_id):
                        yield chunk
                except Exception as exc:  # noqa: BLE001 - the stream is open: say it in-band
                    yield f"\n[leoclr] log stream ended: {exc}\n"
            return StreamingResponse(stream(), media_type="text/plain")
        try:
            text = await run_in_threadpool(run.logs, job.submission_id)
        except Exception as exc:  # noqa: BLE001 - Ray is down or forgot the job: a clear 503
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Ray could not give the log: {exc}") from None
        return PlainTextResponse("".join(text.splitlines(keepends=True)[-tail:]))

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=authed, response_model=JobOut,
              responses=_errors(401, 404, 409, 422, 503))
    def cancel(request: Request, job_id: JobId) -> Any:
        store: JobStore = request.app.state.store
        job = _job(request, job_id)
        if job.status in FINISHED:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {job.status}")
        run: Runner | None = request.app.state.runner
        admission: Admission | None = request.app.state.admission
        cancelled = None
        if not job.submission_id and admission is not None:
            with admission.lock:  # not handed to Ray while it is cancelled here
                if not store.get(job.id).submission_id:
                    cancelled = store.finish(job.id, "cancelled")
            job = store.get(job.id)
        if cancelled is None and job.status not in FINISHED:
            if job.submission_id and run is not None:
                try:
                    stopped = run.stop(job.submission_id)
                except Exception as exc:  # noqa: BLE001 - Ray unreachable: the job may still run there
                    raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                        f"Ray could not be asked to stop the job: {exc}") from None
                if not stopped:
                    job = reconcile_job(store, run, job)  # Ray says it had already ended
                    if job.status in FINISHED:
                        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {job.status}")
            cancelled = store.finish(job.id, "cancelled")  # one of racing cancels wins; the others see it finished
        request.app.state.fresh.pop(job.id, None)
        if cancelled is None:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {_job(request, job_id).status}")
        return cancelled

    # ------------------------------------------------------------------ models
    @app.get("/v1/models", dependencies=authed, response_model=ModelList, responses=_errors(401, 503))
    def list_models(request: Request) -> Any:
        try:
            return {"items": request.app.state.tracking.models()}
        except Unavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None

    @app.get("/v1/models/{name}", dependencies=authed, response_model=Model, responses=_errors(401, 404, 422, 503))
    def get_model(request: Request, name: ModelName) -> Any:
        try:
            return request.app.state.tracking.model(name)
        except NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except Unavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None

    @app.post("/v1/models/{name}/aliases", dependencies=authed, response_model=Model,
              responses=_errors(400, 401, 404, 413, 422, 503))
    def set_alias(request: Request, name: ModelName, body: AliasIn) -> Any:
        """Point `alias` at `version` (e.g. promote a candidate to champion); the alias moves if it existed."""
        try:
            return request.app.state.tracking.set_alias(name, body.alias, body.version)
        except NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except Unavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None

    return app
