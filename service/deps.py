"""What the routes take from the app, as FastAPI dependencies (`Annotated` types).

The app's lifespan puts the backends in `app.state` (app.py); this module is the one place that
reads them from there, so a route declares what it needs in its signature and a test can replace
any of them with `app.dependency_overrides`. The trivial ones are `async def`: a plain `def`
dependency costs a hop to a worker thread on every request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, status
from prometheus_client import CollectorRegistry

from service.admission import Admission
from service.reconcile import RayHealth
from service.runner import Runner
from service.schemas import JOB_ID, JobOut
from service.settings import ServiceSettings
from service.store import Job, JobStore
from service.tracking import LazyTracking, Tracking

JobId = Annotated[str, Path(pattern=JOB_ID, description="A job's id, as POST /v1/jobs returned it.")]
FINISHED_VIEWS = 4096  # finished jobs whose rendered view is kept (a few KB each)


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


@dataclass
class JobViews:
    """What GET /v1/jobs/{id} keeps between reads (routers/jobs.py says why each is safe to keep)."""

    fresh_s: float  # how long an unfinished job's view is reused
    finished: RenderedViews = field(default_factory=lambda: RenderedViews(FINISHED_VIEWS))  # id -> JSON
    final_progress: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # id -> a finished job's
    fresh: dict[str, tuple[float, JobOut]] = field(default_factory=dict)  # id -> (when, view), unfinished

    def recent(self, job_id: str) -> JobOut | None:
        hit = self.fresh.get(job_id)
        return hit[1] if hit is not None and time.monotonic() - hit[0] < self.fresh_s else None


async def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_runner(request: Request) -> Runner | None:
    return request.app.state.runner  # None: no Ray cluster is configured


async def get_admission(request: Request) -> Admission | None:
    return request.app.state.admission


async def get_health(request: Request) -> RayHealth:
    return request.app.state.health


async def get_views(request: Request) -> JobViews:
    return request.app.state.views


async def get_metrics_registry(request: Request) -> CollectorRegistry:
    return request.app.state.metrics


async def get_lazy_tracking(request: Request) -> LazyTracking:
    return request.app.state.tracking


def get_tracking(lazy: Annotated[LazyTracking, Depends(get_lazy_tracking)]) -> Tracking:
    # a plain def: the first call imports mlflow and opens its store, off the event loop
    return lazy()


Settings = Annotated[ServiceSettings, Depends(get_settings)]
Store = Annotated[JobStore, Depends(get_store)]
OptionalRunner = Annotated[Runner | None, Depends(get_runner)]
OptionalAdmission = Annotated[Admission | None, Depends(get_admission)]
Health = Annotated[RayHealth, Depends(get_health)]
Views = Annotated[JobViews, Depends(get_views)]
MetricsRegistry = Annotated[CollectorRegistry, Depends(get_metrics_registry)]
TrackingReader = Annotated[LazyTracking, Depends(get_lazy_tracking)]  # a Tracking made when called
MlflowTracking = Annotated[Tracking, Depends(get_tracking)]


def job_or_404(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return job


def find_job(job_id: JobId, store: Store) -> Job:
    return job_or_404(store, job_id)


FoundJob = Annotated[Job, Depends(find_job)]
