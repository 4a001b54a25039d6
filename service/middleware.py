"""The API's ASGI middlewares and its Prometheus collector. Plain ASGI classes, not
`@app.middleware("http")`: those run every request through an extra task and memory streams,
which cost more than the reads they wrap, and they cannot see a body as it streams in."""

from __future__ import annotations

import time
from typing import Any

from fastapi import HTTPException, status
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from service.store import JobStore


class BodyLimit:
    """Refuses a body over the limit: by its Content-Length before reading, or once the bytes
    read pass it (a chunked upload has no length)."""

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


class Measure:
    """Counts requests and their latency by method, route template (bounded labels) and status."""

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


class JobsCollector:
    """`leoclr_jobs{status,kind}`: read from the store when Prometheus scrapes, never kept twice."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self) -> Any:
        family = GaugeMetricFamily("leoclr_jobs", "Jobs in the store, by status and kind", labels=["status", "kind"])
        for (st, kind), n in self.store.counts().items():
            family.add_metric([st, kind], n)
        yield family
