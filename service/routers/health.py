"""Probes (anyone may read them) and the Prometheus metrics (with the token)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.auth import require_token
from service.deps import Health, MetricsRegistry, OptionalRunner, Store
from service.schemas import ProbeOut, errors

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz", response_model=ProbeOut)
async def healthz() -> ProbeOut:
    """The process answers."""
    return ProbeOut(status="ok")


@router.get("/readyz", operation_id="readyz", response_model=ProbeOut, responses=errors(503))
def readyz(store: Store, runner: OptionalRunner, health: Health) -> ProbeOut:
    """Ready to run jobs: the job store answers, and so did the Ray Jobs API when last asked
    (every reconcile pass asks; before the first, this asks)."""
    try:
        store.list(limit=1)
    except Exception as exc:  # noqa: BLE001 - any database error: not ready, and why
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"the job store does not answer: {exc}") from None
    if runner is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no Ray cluster is configured for this service")
    if health.checked is None:
        health.check(runner)
    if not health.ok:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"the Ray Jobs API does not answer (for {health.down_for():.0f} s): {health.error}")
    return ProbeOut(status="ready")


@router.get("/metrics", operation_id="metrics", dependencies=[Depends(require_token)],
            response_class=PlainTextResponse, responses=errors(401, plain=True))
def metrics(registry: MetricsRegistry) -> Response:
    """Prometheus's text format: requests and their latency by route, jobs by status and kind, the process."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
