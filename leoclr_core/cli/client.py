"""A small client of the REST API (httpx): what `leoclr submit|status|logs|cancel|models` use.

The API's address comes from LEOCLR_API_URL; the token from LEOCLR_API_TOKEN or, on the machine
the service runs on, the token file it wrote into the data directory. The client never imports
the service: it knows it only through its routes and these variables.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable, Iterator

import httpx

from leoclr_core.settings import ClientSettings

FINISHED = ("succeeded", "failed", "cancelled", "lost")


class ApiError(Exception):
    def __init__(self, status: int | None, detail: str):
        super().__init__(detail if status is None else f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:2000]
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)


class ApiClient:
    def __init__(self, url: str | None = None, token: str | None = None,
                 settings: ClientSettings | None = None, timeout: float = 30.0, http: httpx.Client | None = None):
        s = settings or ClientSettings()
        if http is not None:  # an already configured client (tests: FastAPI's TestClient)
            self.url, self.http = str(http.base_url).rstrip("/"), http
            return
        self.url = (url or s.api_url).rstrip("/")
        token = token or s.api_token
        if token is None and s.token_file.is_file():
            token = s.token_file.read_text().strip()
        if not token:
            raise ApiError(None, f"no API token: set LEOCLR_API_TOKEN, or run this where `leoclr serve` "
                                 f"wrote {s.token_file}")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ApiError(None, f"cannot reach the API at {self.url}: {exc}") from None
        if r.is_error:
            raise ApiError(r.status_code, _detail(r))
        return r

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=spec, headers=headers).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self, status: str | None = None, kind: str | None = None, limit: int = 50) -> dict[str, Any]:
        params = {k: v for k, v in {"status": status, "kind": kind, "limit": limit}.items() if v is not None}
        return self._call("GET", "/v1/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def metrics(self, job_id: str, keys: list[str] | None = None) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}/metrics", params={"key": keys or []}).json()

    def logs(self, job_id: str, tail: int = 1000) -> str:
        return self._call("GET", f"/v1/jobs/{job_id}/logs", params={"tail": tail}).text

    def follow_logs(self, job_id: str) -> Iterator[str]:
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": True}, timeout=None) as r:
                if r.is_error:
                    r.read()
                    raise ApiError(r.status_code, _detail(r))
                yield from r.iter_text()
        except httpx.HTTPError as exc:
            raise ApiError(None, f"log stream from {self.url} broke: {exc}") from None

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models").json()["items"]

    def set_alias(self, name: str, alias: str, version: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/models/{name}/aliases", json={"alias": alias, "version": version}).json()

    def wait(self, job_id: str, interval: float = 2.0, on_update: Any = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Poll the job until it finishes; `on_update(job)` after each read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(interval)


def follow(client: ApiClient, job_id: str, on_update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """`client.wait` for a job, where a Ctrl-C raises KeyboardInterrupt at the next poll at the latest.

    Python drops a KeyboardInterrupt that lands while a finaliser (a `__del__`, a weakref callback)
    runs; a Ctrl-C lost that way would leave `make run` following a job it was asked to stop. So the
    handler also sets a flag that every poll checks."""
    interrupted = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    def update(job: dict[str, Any]) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        on_update(job)

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Python's own handler stays
        previous = None
    try:
        return client.wait(job_id, on_update=update)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
