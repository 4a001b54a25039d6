"""How jobs reach Ray: Ray Jobs (`JobSubmissionClient`), the driver being this project's own CLI.

The spec travels in the job's environment (`LEOCLR_JOB_SPEC`, JSON), so the driver needs no
file shared with the API. `leoclr run-job` reads it and runs the job on the cluster it is in.
"""

from __future__ import annotations

import json
import threading
from typing import Any, AsyncIterator, Callable, Protocol

from leoclr_core.contract import ENV_JOB_ID, ENV_JOB_SPEC
from service.first_use import FIRST_USE

# Ray job statuses -> ours. PENDING: accepted, driver not started yet.
STATUS_MAP = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
              "STOPPED": "cancelled"}


# A cancelled driver gets SIGTERM, then SIGKILL this much later (Ray's default, 3 s, is too short for
# it to close its MLflow run and let Ray Train tear its workers down).
STOP_GRACE_S = "20"


class JobGone(RuntimeError):
    """Ray answers but has no record of the job: the head it ran on died or was replaced."""


class Runner(Protocol):
    def submit(self, job_id: str, spec: dict[str, Any]) -> str: ...
    def status(self, submission_id: str) -> str: ...  # raises JobGone, or any error when Ray is unreachable
    def stop(self, submission_id: str) -> bool: ...  # False: the job had already ended
    def logs(self, submission_id: str) -> str: ...
    def tail(self, submission_id: str) -> AsyncIterator[str]: ...
    def ping(self) -> None: ...  # raises when the Jobs API does not answer
    def cluster_resources(self) -> dict[str, float]: ...  # {"CPU": total, "GPU": total, ...} of the alive nodes


class RayJobsRunner:
    """`address`: the Ray dashboard's HTTP address (the Jobs API), or a function that finds it (asked
    again until it answers, so a service can start before its cluster). `env`: variables every driver
    gets (where MLflow and the data directory are), so jobs land where the API looks."""

    def __init__(self, address: str | Callable[[], str], entrypoint: str = "leoclr run-job",
                 env: dict[str, str] | None = None):
        self._find = address if callable(address) else (lambda: address)
        self._client: Any = None
        self._lock = threading.Lock()
        self.address: str | None = None if callable(address) else address
        self.entrypoint, self.env = entrypoint, dict(env or {})

    @property
    def client(self) -> Any:
        """The Jobs client, made on first use: JobSubmissionClient asks the cluster for its version when
        it is made, and a cluster that is down at the service's start must not stop the service."""
        client = self._client
        if client is not None:
            return client
        find = self._find  # not under the lock: finding a cluster that is down can take a while
        address = find()
        with FIRST_USE:  # Ray's import and the client's first use, never beside MLflow's (service/first_use.py)
            from ray.job_submission import JobSubmissionClient  # not torch: the API may import it

            client = JobSubmissionClient(address)
        with self._lock:
            if self._find is find:  # not retargeted meanwhile
                self._client, self.address = client, address
        return client

    def retarget(self, address: str) -> None:
        """Point at a new Jobs API (the embedded head was restarted on new ports)."""
        with self._lock:
            self._find, self._client, self.address = (lambda: address), None, address

    def submit(self, job_id: str, spec: dict[str, Any]) -> str:
        return self.client.submit_job(
            entrypoint=self.entrypoint,
            submission_id=f"leoclr-{job_id}",
            runtime_env={"env_vars": {**self.env, "RAY_JOB_STOP_WAIT_TIME_S": STOP_GRACE_S, ENV_JOB_SPEC: json.dumps(spec), ENV_JOB_ID: job_id}},
            metadata={"leoclr_job": job_id, "kind": str(spec.get("kind")), "name": str(spec.get("name"))},
        )

    def status(self, submission_id: str) -> str:
        try:
            raw = self.client.get_job_status(submission_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc):  # Ray's 404 for a job id it never saw
                raise JobGone(str(exc)) from None
            raise
        return STATUS_MAP.get(str(raw).split(".")[-1], "running")

    def stop(self, submission_id: str) -> bool:
        return bool(self.client.stop_job(submission_id))

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)

    def tail(self, submission_id: str) -> AsyncIterator[str]:
        """The driver's log as it is written, until the job ends (Ray streams it over a websocket)."""
        return self.client.tail_job_logs(submission_id)

    def ping(self) -> None:
        response = self.client._do_request("GET", "/api/version")  # the cheapest call the Jobs API answers
        if response.status_code != 200:
            raise ConnectionError(f"the Ray Jobs API at {self.address} answered HTTP {response.status_code}")

    def cluster_resources(self) -> dict[str, float]:
        """Ray's own view: the total resources of its alive nodes (the state API, over the dashboard)."""
        with FIRST_USE:
            from ray.util.state import list_nodes

        totals: dict[str, float] = {}
        for node in list_nodes(address=self.client.get_address(), filters=[("state", "=", "ALIVE")], detail=True,
                               raise_on_missing_output=False):
            for name, value in (node.resources_total or {}).items():
                if not name.startswith("node:"):
                    totals[name] = totals.get(name, 0.0) + float(value)
        return totals


def dashboard_url(address: str) -> str:
    """The Jobs API of the Ray cluster at `address` (a GCS address such as RAY_ADDRESS): the cluster
    says where its dashboard is when a driver connects."""
    with FIRST_USE:
        import leoclr_core.distributed  # noqa: F401 - how a driver reaches a loopback cluster, before Ray is imported
        import ray

    ctx = ray.init(address=address, log_to_driver=False)
    try:
        url = ctx.dashboard_url
    finally:
        ray.shutdown()
    if not url:
        raise RuntimeError(f"the Ray cluster at {address} runs no dashboard, so no Jobs API: start its head with "
                           "--include-dashboard=true, or set LEOCLR_RAY_JOBS_ADDRESS")
    return url if "://" in url else f"http://{url}"
