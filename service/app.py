"""The FastAPI app: its state (made in the lifespan), its routers (routers/), its middlewares.

Routes take what they need through the dependencies of deps.py. Nothing here imports mlflow:
the tracking reader is made on first use, so the API answers its probes within a second or so
of its start (tests/unit/test_service_imports.py guards the imports).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

from service.admission import Admission
from service.auth import BearerAuth, ensure_token
from service.deps import JobViews
from service.middleware import BodyLimit, JobsCollector, Measure
from service.reconcile import RayHealth, Reconciler
from service.routers import health, jobs, models
from service.runner import Runner
from service.settings import ServiceSettings
from service.store import JobStore
from service.tracking import LazyTracking, Tracking


def create_app(settings: ServiceSettings | None = None, runner: Runner | None = None,
               reconcile_interval: float = 2.0, tracking: Tracking | None = None, fresh_s: float = 1.0) -> FastAPI:
    """`runner`: Ray Jobs (None: jobs are refused as failed, /readyz says 503). `tracking`: an MLflow
    reader to use instead of one made on first use. `fresh_s`: how long an unfinished job's view is reused."""
    s = settings or ServiceSettings()
    metrics = CollectorRegistry()
    ProcessCollector(registry=metrics)  # process_cpu_seconds_total etc.: what the API costs (bench.api_load)
    requests = Counter("leoclr_http_requests", "HTTP requests", ["method", "route", "status"], registry=metrics)
    latency = Histogram("leoclr_http_request_seconds", "HTTP request latency", ["method", "route"], registry=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        state.settings, state.runner, state.metrics = s, runner, metrics
        state.store = JobStore(s.job_database_url)
        state.token = ensure_token(s.api_token, s.token_file)
        state.tracking = LazyTracking(s.tracking_uri, tracking)
        state.views = JobViews(fresh_s)
        state.health = RayHealth()
        state.admission = None
        metrics.register(JobsCollector(state.store))
        reconciler = None
        if runner is not None:
            state.admission = Admission(runner, s.max_running_jobs, s.max_resources, ready=state.tracking.jobs_may_start)
            reconciler = Reconciler(state.store, runner, reconcile_interval, state.admission, s.ray_lost_after_s,
                                    state.health, state.tracking.result)
            reconciler.start()
        yield
        if reconciler is not None:
            reconciler.stop()
        state.store.close()  # a server's pooled connections go back now, not when the process ends

    app = FastAPI(title="LeOCLR training service", version="0.1.0", lifespan=lifespan)
    for router in (health.router, jobs.router, models.router):
        app.include_router(router)
    app.add_exception_handler(RequestValidationError, jobs.spec_errors)  # type: ignore[arg-type]
    # The last added runs first: measure everything, then refuse a stranger before reading any body.
    app.add_middleware(BodyLimit, limit=s.max_body_bytes)
    app.add_middleware(BearerAuth)
    app.add_middleware(Measure, requests=requests, latency=latency)
    return app
