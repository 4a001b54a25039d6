"""The embedded Ray head SIGKILLed (its process group: ray start, gcs_server, raylet) mid-job: the
job is marked `lost` with the reason, /readyz answers 503 while no head answers, the service starts
a new head by itself and is ready again, and a job submitted then succeeds."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from .conftest import tiny_job

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.timeout(900)]

LOST_AFTER_S = 10


def test_head_killed_mid_job_marks_it_lost_and_the_service_recovers(make_service, figures):
    svc = make_service(2, LEOCLR_RAY_LOST_AFTER_S=str(LOST_AFTER_S))
    job_id = svc.submit(tiny_job("chaos-head-kill", epochs=200))["id"]

    def training() -> dict | None:  # mid-job: the driver runs and rank 0 has logged steps
        job = svc.job(job_id)
        assert job["status"] in ("queued", "running"), job
        return job if job["status"] == "running" and (job.get("progress") or {}).get("step") else None

    svc.until(training, 240, "the job to run and log its first steps")
    head = svc.head()["pid"]
    os.killpg(head, signal.SIGKILL)
    killed = time.monotonic()

    lost_at = not_ready_at = ready_at = new_head_at = None
    job: dict = {}

    def since(t: float | None) -> str:
        return "never" if t is None else f"{t - killed:.1f} s"

    def seen() -> str:
        return (f"job {job.get('status')!r} (lost after {since(lost_at)}), /readyz first not 200 after "
                f"{since(not_ready_at)}, a new head recorded after {since(new_head_at)}, /readyz 200 with it after "
                f"{since(ready_at)}")

    # Until the job is lost and the service answers ready on a new head; whether /readyz said 503
    # meanwhile is asserted after the new job has run, so that one run measures every figure.
    deadline = killed + 120
    while lost_at is None or ready_at is None:
        assert svc.proc.poll() is None, f"`leoclr serve` exited with code {svc.proc.returncode}\n{svc.log()}"
        if time.monotonic() > deadline:
            figures(f"head-kill (failed): {seen()}")
            pytest.fail(f"120 s after the head was killed: {seen()}; the job's error: {job.get('error')!r}\n"
                        f"{svc.log()}")
        try:
            job = svc.job(job_id, timeout=10)
        except httpx.TimeoutException:
            pytest.fail(f"GET /v1/jobs/{job_id} did not answer within 10 s with the Ray head gone\n{svc.log()}")
        now = time.monotonic()
        if job["status"] == "lost" and lost_at is None:
            lost_at = now
        assert job["status"] in ("running", "lost"), (
            f"a job whose Ray head died must become `lost`, not {job['status']!r}: {job.get('error')}")
        if new_head_at is None and svc.head()["pid"] != head:  # written once the new head answers
            new_head_at = now
        code = svc.readyz()
        if code != 200 and not_ready_at is None:
            not_ready_at = now
        if code == 200 and new_head_at is not None and ready_at is None:
            ready_at = now
        time.sleep(0.5)

    error = job.get("error") or ""
    assert "ray" in error.lower(), f"the lost job's error does not say Ray lost it: {error!r}"

    started = time.monotonic()
    after = svc.submit(tiny_job("chaos-after-head-kill"))["id"]
    done = svc.all_finished([after], 400)[after]
    figures(f"head-kill: time-to-detect (kill -> job lost) {since(lost_at)} (LEOCLR_RAY_LOST_AFTER_S={LOST_AFTER_S}), "
            f"/readyz not 200 after {since(not_ready_at)}, time-to-recover (kill -> new head recorded) "
            f"{since(new_head_at)}, (kill -> /readyz 200 on it) {since(ready_at)}, "
            f"new job {done['status']} in {time.monotonic() - started:.0f} s")
    assert done["status"] == "succeeded", f"a job on the new head: {done['status']}: {done.get('error')}\n{svc.log()}"
    assert svc.job(job_id)["status"] == "lost", "the lost job changed status again on the new head"
    assert not_ready_at is not None, (
        f"/readyz answered 200 all along while the Ray head was dead and restarted ({seen()}): a load balancer "
        "would have kept sending jobs to a service that could not run them")
