"""The API SIGKILLed with jobs queued (held by the admission gate) and running, then started again
on the same data directory and port: it finds its Ray head and every job again, reports each one,
and follows every one to `succeeded`."""

from __future__ import annotations

import time

import pytest

from .conftest import tiny_job

pytestmark = [pytest.mark.chaos, pytest.mark.ray, pytest.mark.timeout(900)]

JOBS, LIMIT = 3, 2  # 2 running (2 CPUs each on a 4-CPU head), 1 held queued by the gate


def test_api_killed_with_jobs_queued_and_running_reports_and_finishes_every_job(make_service, figures):
    svc = make_service(4, LEOCLR_MAX_RUNNING_JOBS=str(LIMIT))
    accepted = [svc.submit(tiny_job(f"chaos-api-kill-{i}", epochs=2))["id"] for i in range(JOBS)]

    def training_and_queued() -> dict[str, str] | None:
        # Training has begun (the job's MLflow run exists) while another job still waits: that one is
        # held by the service's gate, not waiting its turn inside Ray (whose driver would have started).
        status = {i: j["status"] for i, j in svc.jobs().items()}
        running = [i for i, st in status.items() if st == "running"]
        training = any(svc.job(i).get("progress") is not None for i in running)
        if training and len(running) > LIMIT:
            figures(f"api-kill (failed): {len(running)} of {JOBS} jobs running with LEOCLR_MAX_RUNNING_JOBS={LIMIT}")
            pytest.fail(f"{len(running)} jobs running with LEOCLR_MAX_RUNNING_JOBS={LIMIT}: no admission gate "
                        f"held the others queued\n{svc.log()}")
        return status if training and "queued" in status.values() else None

    at_kill = svc.until(training_and_queued, 240, "a job training while another is held queued by the "
                        f"admission gate (LEOCLR_MAX_RUNNING_JOBS={LIMIT})")
    head = svc.head()["pid"]
    svc.kill_api()
    killed = time.monotonic()
    restart = svc.start()  # same data directory and port
    to_healthy = time.monotonic() - killed
    assert svc.head()["pid"] == head, "the restarted API started a new Ray head instead of reusing the live one"

    reported = svc.jobs()
    missing = [i for i in accepted if i not in reported]
    assert not missing, f"jobs accepted before the kill but not reported after it: {missing}\n{svc.log()}"
    done = svc.all_finished(accepted, 600)
    finished = time.monotonic() - killed
    statuses = {i: done[i]["status"] for i in accepted}
    figures(f"api-kill: accepted {JOBS} ({list(at_kill.values()).count('running')} running, "
            f"{list(at_kill.values()).count('queued')} queued at the kill), reported {JOBS - len(missing)}, "
            f"succeeded {list(statuses.values()).count('succeeded')}, restart-to-healthy {restart:.1f} s "
            f"(kill-to-healthy {to_healthy:.1f} s), kill-to-all-finished {finished:.0f} s")
    failed = {i: (done[i]["status"], (done[i].get("error") or "")[-800:]) for i in accepted
              if done[i]["status"] != "succeeded"}
    assert not failed, f"jobs that did not succeed after the restart: {failed}\n{svc.log()}"
