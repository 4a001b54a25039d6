"""Follows Ray's view of every unfinished job into the store, in a background thread.

It reads the store afresh each pass, so an API that restarts (or was killed) picks up every job
it had not seen finish. Each pass also asks whether the Ray Jobs API answers at all: /readyz says
what it found, and a job Ray has lost is marked `lost` instead of `running` for ever:
- at once, when Ray answers but has no record of the job (its head died and a new one took over:
  the embedded head restarted by the service, or `leoclr serve` restarted with a new head);
- after LEOCLR_RAY_LOST_AFTER_S of no answer from the Jobs API at all (a head that stays down).
Jobs that never reached Ray stay `queued` and go to whichever head answers next (admission.py).
A finished job's result is what its driver logged to its MLflow run (`ReadResult`, see
tracking.Tracking.result), kept in the store so that lists show it without asking MLflow.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from service.admission import Admission
from service.runner import JobGone, Runner
from service.store import FINISHED, Job, JobStore

log = logging.getLogger(__name__)

# A finished job's result, or None when it has none; may raise when MLflow cannot be read.
ReadResult = Callable[[Job], "dict[str, Any] | None"]


class RayHealth:
    """Whether the Ray Jobs API answered the last time it was asked, and since when it has not."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.error: str | None = None
        self.checked: float | None = None

    def record(self, error: BaseException | None) -> None:
        self.checked = time.monotonic()
        if error is None:
            self.down_since, self.error = None, None
        else:
            self.down_since = self.down_since or self.checked
            self.error = f"{type(error).__name__}: {error}"

    @property
    def ok(self) -> bool:
        return self.checked is not None and self.down_since is None

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def check(self, runner: Runner) -> bool:
        try:
            runner.ping()
        except Exception as exc:  # noqa: BLE001 - any failure to answer is "not reachable"
            self.record(exc)
            return False
        self.record(None)
        return True


def reconcile_job(store: JobStore, runner: Runner, job: Job, health: RayHealth | None = None,
                  lost_after_s: float = 30.0, read_result: ReadResult | None = None) -> Job:
    """Bring one job that Ray was given up to Ray's view of it: its status, and when it has
    finished, its result (`read_result`: from its MLflow run) or error (the end of the driver's
    log). The background loop and a read of the job both go through here, so neither can record a
    finished status without its result; one MLflow could not give now is read again when the job
    is (routers/jobs.py). A job not yet given to Ray is left as it is: the admission gate hands it over."""
    if not job.submission_id or job.status in FINISHED:
        return job
    if health is None or health.down_since is None:
        try:
            status = runner.status(job.submission_id)
        except JobGone as exc:
            return _mark_lost(store, job, f"Ray has no record of its job: the Ray head it ran on died or was "
                                          f"replaced ({exc})")
        except Exception as exc:  # noqa: BLE001 - Ray unreachable: lost only once it has been for long enough
            log.debug("status of %s: %s", job.id, exc)
            if health is None:
                return job
            health.record(exc)
    if health is not None and health.down_since is not None:
        if health.down_for() >= lost_after_s:
            return _mark_lost(store, job, f"the Ray Jobs API has not answered for {health.down_for():.0f} s "
                                          f"(LEOCLR_RAY_LOST_AFTER_S={lost_after_s:g}): {health.error}")
        return job
    if status == job.status:
        return job
    if status not in FINISHED:
        return store.advance(job.id, status) or store.get(job.id) or job
    fields: dict[str, Any] = {}
    if read_result is not None:
        try:
            fields["result"] = read_result(job)
        except Exception as exc:  # noqa: BLE001 - MLflow unreachable: the status is still Ray's to record
            log.warning("result of job %s: %s", job.id, exc)
    if status == "failed":
        try:
            fields["error"] = "\n".join(runner.logs(job.submission_id).strip().splitlines()[-20:])
        except Exception as exc:  # noqa: BLE001
            log.debug("logs of %s: %s", job.id, exc)
    return _finish(store, job, status, **fields)


def _finish(store: JobStore, job: Job, status: str, **fields: Any) -> Job:
    """Finished once: a cancel that landed since this pass read the job is kept, not overwritten."""
    return store.finish(job.id, status, **fields) or store.get(job.id) or job


def _mark_lost(store: JobStore, job: Job, reason: str) -> Job:
    log.warning("job %s (%s) lost: %s", job.id, job.name, reason)
    return _finish(store, job, "lost", error=f"lost: {reason}")


def reconcile_once(store: JobStore, runner: Runner, admission: Admission | None = None,
                   health: RayHealth | None = None, lost_after_s: float = 30.0,
                   read_result: ReadResult | None = None) -> int:
    """One pass: Ray's health, every job Ray was given, then the gate; returns how many jobs changed status."""
    health = health or RayHealth()
    reachable = health.check(runner)
    changed = 0
    for job in store.unfinished():
        if job.submission_id:
            changed += reconcile_job(store, runner, job, health, lost_after_s, read_result).status != job.status
    if admission is not None:
        for job in admission.admit(store, reachable):
            # A job just handed over is read back at once, not a pass later: Ray may already run it.
            changed += reconcile_job(store, runner, job, health, lost_after_s, read_result).status != "queued"
    return changed


class Reconciler:
    def __init__(self, store: JobStore, runner: Runner, interval: float = 2.0, admission: Admission | None = None,
                 lost_after_s: float = 30.0, health: RayHealth | None = None, read_result: ReadResult | None = None):
        self.store, self.runner, self.interval = store, runner, interval
        self.admission, self.lost_after_s, self.read_result = admission, lost_after_s, read_result
        self.health = health or RayHealth()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="leoclr-reconcile", daemon=True)

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                reconcile_once(self.store, self.runner, self.admission, self.health, self.lost_after_s,
                               self.read_result)
            except Exception as exc:  # noqa: BLE001 - a bad pass must not end the loop
                log.warning("reconcile pass failed: %s", exc)
            self.stop_event.wait(self.interval)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)

