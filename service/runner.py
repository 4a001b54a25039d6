"""How jobs reach Ray: Ray Jobs (`JobSubmissionClient`), the driver being this project's own CLI.

The spec travels in the job's environment (`LEOCLR_JOB_SPEC`, JSON), so the driver needs no
file shared with the API. `leoclr run-job` reads it and runs the job on the cluster it is in.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Protocol

import leoclr_core.distributed  # noqa: F401 - Ray's environment (token auth, loopback), before Ray is imported

from leoclr_core.contract import ENV_JOB_ID, ENV_JOB_SPEC

# Ray job statuses -> ours. PENDING: accepted, driver not started yet.
STATUS_MAP = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
              "STOPPED": "cancelled"}


# A cancelled driver gets SIGTERM, then SIGKILL this much later (Ray's default, 3 s, is too short for
# it to close its MLflow run and let Ray Train tear its workers down).
STOP_GRACE_S = "20"


class Runner(Protocol):
    def submit(self, job_id: str, spec: dict[str, Any]) -> str: ...
    def status(self, submission_id: str) -> str: ...
    def stop(self, submission_id: str) -> bool: ...  # False: the job had already ended
    def logs(self, submission_id: str) -> str: ...
    def tail(self, submission_id: str) -> AsyncIterator[str]: ...


class RayJobsRunner:
    """`address`: the Ray dashboard's HTTP address (the Jobs API). `env`: variables every driver
    gets (where MLflow and the data directory are), so jobs land where the API looks."""

    def __init__(self, address: str, entrypoint: str = "leoclr run-job", env: dict[str, str] | None = None):
        from ray.job_submission import JobSubmissionClient  # not torch: the API may import it

        self.client = JobSubmissionClient(address)
        self.entrypoint, self.env = entrypoint, dict(env or {})

    def submit(self, job_id: str, spec: dict[str, Any]) -> str:
        return self.client.submit_job(
            entrypoint=self.entrypoint,
            submission_id=f"leoclr-{job_id}",
            runtime_env={"env_vars": {**self.env, "RAY_JOB_STOP_WAIT_TIME_S": STOP_GRACE_S, ENV_JOB_SPEC: json.dumps(spec), ENV_JOB_ID: job_id}},
            metadata={"leoclr_job": job_id, "kind": str(spec.get("kind")), "name": str(spec.get("name"))},
        )

    def status(self, submission_id: str) -> str:
        return STATUS_MAP.get(str(self.client.get_job_status(submission_id)).split(".")[-1], "running")

    def stop(self, submission_id: str) -> bool:
        return bool(self.client.stop_job(submission_id))

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)

    def tail(self, submission_id: str) -> AsyncIterator[str]:
        """The driver's log as it is written, until the job ends (Ray streams it over a websocket)."""
        return self.client.tail_job_logs(submission_id)


def dashboard_url(address: str) -> str:
    """The Jobs API of the Ray cluster at `address` (a GCS address such as RAY_ADDRESS): the cluster
    says where its dashboard is when a driver connects."""
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
