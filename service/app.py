"""The FastAPI app: thin routes over the job store, the runner (Ray Jobs) and MLflow."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.concurrency import run_in_threadpool

from leoclr_core.spec import KINDS, SpecError, parse_spec

from .auth import ensure_token, require_token
from .policy import PolicyError, check_spec
from .reconcile import Reconciler, reconcile_job, submit_job
from .runner import Runner
from .schemas import AliasIn, JobList, JobOut, MetricHistory, Model, ModelList, Progress
from .settings import ServiceSettings
from .store import FINISHED, STATUSES, Job, JobStore
from .tracking import NotFound, Tracking


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
        registry.register(JobsCollector(app.state.store))
        reconciler = Reconciler(app.state.store, runner, reconcile_interval) if runner is not None else None
        if reconciler is not None:
            reconciler.start()
        yield
        if reconciler is not None:
            reconciler.stop()

    app = FastAPI(title="LeOCLR training service", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=s.max_body_bytes)
    authed = [Depends(require_token)]

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")  # the template: bounded labels
        latency.labels(request.method, route).observe(time.perf_counter() - started)
        requests.labels(request.method, route, str(response.status_code)).inc()
        return response

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> dict[str, str]:
        request.app.state.store.list(limit=1)
        return {"status": "ready"}

    @app.get("/metrics", dependencies=authed, response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ jobs
    @app.post("/v1/jobs", status_code=status.HTTP_201_CREATED, dependencies=authed, response_model=JobOut)
    def submit(request: Request, body: dict[str, Any],
               idempotency_key: Annotated[str | None, Header(max_length=128)] = None) -> Any:
        try:
            spec = parse_spec(body)
            check_spec(spec, s.allowed_data_roots, s.home)
        except (SpecError, PolicyError) as exc:
            raise HTTPException(422, str(exc)) from None
        store: JobStore = request.app.state.store
        job, created = store.create(spec.kind, spec.name, spec.model_dump(mode="json"), idempotency_key)
        if not created:
            return JSONResponse(JobOut.model_validate(job).model_dump(mode="json"), status.HTTP_200_OK)
        run: Runner | None = request.app.state.runner
        if run is None:
            return store.update(job.id, status="failed", error="no Ray cluster is configured for this service")
        return submit_job(store, run, job)

    @app.get("/v1/jobs", dependencies=authed, response_model=JobList)
    def list_jobs(request: Request, status_: Annotated[str | None, Query(alias="status")] = None,
                  kind: str | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: Annotated[int, Query(ge=0)] = 0) -> Any:
        if status_ is not None and status_ not in STATUSES:
            raise HTTPException(422, f"status must be one of {list(STATUSES)}")
        if kind is not None and kind not in KINDS:
            raise HTTPException(422, f"kind must be one of {list(KINDS)}")
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
        if job.status in FINISHED and progress is not None:
            cache[job.id] = progress
        return progress

    @app.get("/v1/jobs/{job_id}", dependencies=authed, response_model=JobOut)
    def get_job(request: Request, job_id: str) -> Any:
        # An unfinished job's view (Ray's status, MLflow's progress) is built at most once per
        # fresh_s: dashboards polling it then cost a dictionary read, not two remote calls.
        fresh = request.app.state.fresh
        hit = fresh.get(job_id)
        if hit is not None and time.monotonic() - hit[0] < fresh_s:
            return hit[1]
        job = _job(request, job_id)
        run: Runner | None = request.app.state.runner
        if job.status not in FINISHED and run is not None:
            job = reconcile_job(request.app.state.store, run, job)  # Ray's view, on read too
        out = JobOut.model_validate(job)
        progress = _progress(request, job)
        out.progress = Progress(**progress) if progress is not None else None
        if job.status not in FINISHED:
            fresh[job_id] = (time.monotonic(), out)
        else:
            fresh.pop(job_id, None)
        return out

    @app.get("/v1/jobs/{job_id}/metrics", dependencies=authed, response_model=MetricHistory)
    def job_metrics(request: Request, job_id: str, key: Annotated[list[str] | None, Query()] = None) -> Any:
        job = _job(request, job_id)
        try:
            return request.app.state.tracking.history(job.id, job.name, key)
        except NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None

    @app.get("/v1/jobs/{job_id}/logs", dependencies=authed, response_class=PlainTextResponse)
    async def job_logs(request: Request, job_id: str, follow: bool = False,
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

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=authed, response_model=JobOut)
    def cancel(request: Request, job_id: str) -> Any:
        job = _job(request, job_id)
        if job.status in FINISHED:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {job.status}")
        run: Runner | None = request.app.state.runner
        if job.submission_id and run is not None and not run.stop(job.submission_id):
            job = reconcile_job(request.app.state.store, run, job)  # Ray says it had already ended
            if job.status in FINISHED:
                raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {job.status}")
        request.app.state.fresh.pop(job.id, None)
        return request.app.state.store.update(job.id, status="cancelled")

    # ------------------------------------------------------------------ models
    @app.get("/v1/models", dependencies=authed, response_model=ModelList)
    def list_models(request: Request) -> Any:
        return {"items": request.app.state.tracking.models()}

    @app.get("/v1/models/{name}", dependencies=authed, response_model=Model)
    def get_model(request: Request, name: str) -> Any:
        try:
            return request.app.state.tracking.model(name)
        except NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None

    @app.post("/v1/models/{name}/aliases", dependencies=authed, response_model=Model)
    def set_alias(request: Request, name: str, body: AliasIn) -> Any:
        """Point `alias` at `version` (e.g. promote a candidate to champion); the alias moves if it existed."""
        try:
            return request.app.state.tracking.set_alias(name, body.alias, body.version)
        except NotFound as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    return app
