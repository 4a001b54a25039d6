"""The MLflow tracking server (PostgreSQL backend, proxied artifacts, as a team runs it) made
unreachable (its process group SIGKILLed) mid-job, then started again on the same port and
database: while it is down the API keeps answering for the job within a bound, saying in
`tracking_error` that MLflow is unreachable, and the job keeps training (a tracking outage neither
kills nor stalls a run: each MLflow call is bounded by the retries and timeout the service gives
drivers, and after a failed one the run's calls pause, its metrics kept for the server's return);
once the server is back the job finishes `succeeded`, its encoder registered, and the job store has
lost nothing."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.backends import start_mlflow

from .conftest import tiny_job

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.timeout(1200)]

REQUEST_BOUND_S = 10  # a status read must answer within this while MLflow is down (a hang guard)
OUTAGE_S = 25  # how long the server stays down
END_BOUND_S = 400  # the job must have ended this long after the server came back (a hang guard)


@pytest.fixture
def mlflow_server(postgres):
    server = start_mlflow(postgres.database("mlflow"))
    yield server
    server.stop()


def test_an_mlflow_outage_mid_job_is_reported_and_survived(make_service, mlflow_server, figures):
    server = mlflow_server
    svc = make_service(2, MLFLOW_TRACKING_URI=server.url)
    # Long enough to outlast the outage with room to spare: an epoch takes about 2 s of wall time here
    # (a Ray Data pass and a checkpoint each), and while MLflow is down a failed call holds training
    # up about 15 s (the drivers' retries) in every 25 s, so at most about 10 s of training, a few
    # epochs here and at most about 20 on a machine four times faster, fall in the outage. Registered,
    # so that the end shows the run's final writes reached the server that came back.
    spec = {**tiny_job("chaos-mlflow-outage", epochs=40), "register": {"model_name": "chaos-outage"}}
    job_id = svc.submit(spec)["id"]

    def training() -> dict | None:  # progress comes from MLflow: the server is in use
        job = svc.job(job_id)
        assert job["status"] in ("queued", "running"), job
        return job if job["status"] == "running" and (job.get("progress") or {}).get("step") else None

    svc.until(training, 240, "the job to run and log its first steps to the MLflow server")
    os.killpg(server.proc.pid, signal.SIGKILL)  # the web workers and job consumers with it
    server.proc.wait()
    killed = time.monotonic()

    reported_at = None
    slowest, reads, job = 0.0, 0, {}

    def read() -> dict:
        nonlocal slowest, reads
        assert svc.proc.poll() is None, f"`leoclr serve` exited with code {svc.proc.returncode}\n{svc.log()}"
        asked = time.monotonic()
        try:
            got = svc.job(job_id, timeout=REQUEST_BOUND_S)
        except httpx.TimeoutException:
            pytest.fail(f"GET /v1/jobs/{job_id} did not answer within {REQUEST_BOUND_S} s with MLflow down\n"
                        f"{svc.log()}")
        slowest, reads = max(slowest, time.monotonic() - asked), reads + 1
        return got

    def seen() -> str:
        when = "never" if reported_at is None else f"after {reported_at - killed:.1f} s"
        return f"tracking_error {when}, slowest GET /v1/jobs/{{id}} {slowest:.1f} s over {reads} reads"

    while time.monotonic() - killed < OUTAGE_S:
        job = read()
        if reported_at is None and job.get("tracking_error"):
            reported_at = time.monotonic()
            assert "mlflow" in job["tracking_error"].lower(), job["tracking_error"]
        assert job["status"] == "running", f"the job did not survive the outage: {job}\n{svc.log()}"
        time.sleep(1)
    assert reported_at is not None, f"no read of the job said MLflow was unreachable: {job}"

    server.start()  # the same port and database
    back = time.monotonic()
    while job.get("status") not in ("succeeded", "failed", "cancelled", "lost"):
        if time.monotonic() - back > END_BOUND_S:
            driver = svc.http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 30}).text
            figures(f"mlflow-outage (failed): job still {job.get('status')} {END_BOUND_S} s after MLflow came back; "
                    f"{seen()}")
            pytest.fail(f"the job was still {job.get('status')!r} {END_BOUND_S} s after MLflow came back; {seen()}\n"
                        f"--- the job's driver log (end) ---\n{driver}\n{svc.log()}")
        job = read()
        time.sleep(1)
    ended = time.monotonic() - back

    stored = svc.jobs()
    figures(f"mlflow-outage: down {OUTAGE_S} s, {seen()}; job {job['status']} {ended:.0f} s after the server came "
            f"back, tracking_error then {job.get('tracking_error')!r}; jobs in the store {len(stored)} of 1")
    assert job["status"] == "succeeded", f"the job ended {job['status']!r}: {job.get('error')}\n{svc.log()}"
    assert not job.get("tracking_error") and (job.get("result") or {}).get("registry_uri"), job
    assert list(stored) == [job_id] and stored[job_id]["spec"]["name"] == spec["name"], stored
