"""Follows Ray's view of every unfinished job into the store, in a background thread.

It reads the store afresh each pass, so an API that restarts (or was killed) picks up every job
it had not seen finish. A finished pretrain/evaluate driver prints its result as a JSON line last;
that line is kept as the job's result.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from typing import Any

from .runner import Runner
from .store import FINISHED, Job, JobStore

log = logging.getLogger(__name__)


def last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


SUBMIT_TIMEOUT_S = 300.0  # how long a queued job keeps trying to reach Ray before it fails


def submit_job(store: JobStore, runner: Runner, job: Job) -> Job:
    """Hand a stored job to Ray. A refusal (a head still starting: "no available agent") leaves it
    queued with the reason; the reconcile loop tries again until SUBMIT_TIMEOUT_S has passed."""
    try:
        submission_id = runner.submit(job.id, job.spec)
    except Exception as exc:  # noqa: BLE001 - kept, with the reason, never dropped
        if "already exists" in str(exc):  # an earlier try got through; its answer did not
            return store.update(job.id, submission_id=f"leoclr-{job.id}", error=None)
        age = (datetime.now(timezone.utc) - _aware(job.created_at)).total_seconds()
        if age > SUBMIT_TIMEOUT_S:
            return store.update(job.id, status="failed", error=f"submission to Ray failed: {exc}")
        return store.update(job.id, error=f"submission to Ray pending (will retry): {exc}")
    return store.update(job.id, submission_id=submission_id, error=None)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)  # SQLite gives naive datetimes back


def reconcile_job(store: JobStore, runner: Runner, job: Job) -> Job:
    """Bring one unfinished job up to Ray's view of it: submit it if it is still waiting, take
    its status, and when it has finished, its result (the driver's last JSON line) or error.
    The background loop and a read of the job both go through here, so neither can record a
    finished status without its result."""
    if not job.submission_id:
        return submit_job(store, runner, job)
    try:
        status = runner.status(job.submission_id)
    except Exception as exc:  # noqa: BLE001 - Ray briefly unreachable: try again next pass
        log.debug("status of %s: %s", job.id, exc)
        return job
    if status == job.status:
        return job
    fields: dict[str, Any] = {"status": status}
    if status in FINISHED:
        try:
            logs = runner.logs(job.submission_id)
            fields["result"] = last_json_line(logs)
            if status == "failed":
                fields["error"] = "\n".join(logs.strip().splitlines()[-20:])
        except Exception as exc:  # noqa: BLE001
            log.debug("logs of %s: %s", job.id, exc)
    return store.update(job.id, **fields)


def reconcile_once(store: JobStore, runner: Runner) -> int:
    """One pass over every unfinished job; returns how many changed status."""
    return sum(reconcile_job(store, runner, job).status != job.status for job in store.unfinished())


class Reconciler:
    def __init__(self, store: JobStore, runner: Runner, interval: float = 2.0):
        self.store, self.runner, self.interval = store, runner, interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="leoclr-reconcile", daemon=True)

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                reconcile_once(self.store, self.runner)
            except Exception as exc:  # noqa: BLE001 - a bad pass must not end the loop
                log.warning("reconcile pass failed: %s", exc)
            self.stop_event.wait(self.interval)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)
