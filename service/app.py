"""The FastAPI app: thin routes over the job store and the runner."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse
from starlette.middleware.base import BaseHTTPMiddleware

from leoclr_core.spec import SpecError, parse_spec

from .auth import ensure_token, require_token
from .reconcile import Reconciler, reconcile_job, submit_job
from .runner import Runner
from .schemas import JobList, JobOut
from .settings import ServiceSettings
from .store import FINISHED, STATUSES, JobStore


class BodyLimit(BaseHTTPMiddleware):
    """Refuses bodies over the limit before they are read (Content-Length) or while they are."""

    def __init__(self, app: Any, limit: int):
        super().__init__(app)
        self.limit = limit

    async def dispatch(self, request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return JSONResponse({"detail": f"request body over {self.limit} bytes"}, 413)
        return await call_next(request)


def create_app(settings: ServiceSettings | None = None, runner: Runner | None = None,
               reconcile_interval: float = 2.0) -> FastAPI:
    s = settings or ServiceSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = JobStore(s.job_database_url)
        app.state.token = ensure_token(s.api_token, s.token_file)
        app.state.runner = runner
        reconciler = Reconciler(app.state.store, runner, reconcile_interval) if runner is not None else None
        if reconciler is not None:
            reconciler.start()
        yield
        if reconciler is not None:
            reconciler.stop()

    app = FastAPI(title="LeOCLR training service", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=s.max_body_bytes)
    authed = [Depends(require_token)]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> dict[str, str]:
        request.app.state.store.list(limit=1)
        return {"status": "ready"}

    @app.post("/v1/jobs", status_code=status.HTTP_201_CREATED, dependencies=authed, response_model=JobOut)
    def submit(request: Request, body: dict[str, Any],
               idempotency_key: Annotated[str | None, Header(max_length=128)] = None) -> Any:
        try:
            spec = parse_spec(body)
        except SpecError as exc:
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
        rows, total = request.app.state.store.list(status_, kind, limit, offset)
        return {"items": rows, "total": total, "limit": limit, "offset": offset}

    def _job(request: Request, job_id: str) -> Any:
        job = request.app.state.store.get(job_id)
        if job is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
        return job

    @app.get("/v1/jobs/{job_id}", dependencies=authed, response_model=JobOut)
    def get_job(request: Request, job_id: str) -> Any:
        job = _job(request, job_id)
        run: Runner | None = request.app.state.runner
        if job.status not in FINISHED and run is not None:
            job = reconcile_job(request.app.state.store, run, job)  # Ray's view, on read too
        return job

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=authed, response_model=JobOut)
    def cancel(request: Request, job_id: str) -> Any:
        job = _job(request, job_id)
        if job.status in FINISHED:
            raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already {job.status}")
        run: Runner | None = request.app.state.runner
        if job.submission_id and run is not None:
            run.stop(job.submission_id)
        return request.app.state.store.update(job.id, status="cancelled")

    return app
