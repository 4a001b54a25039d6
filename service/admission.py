"""The gate between the job store and Ray: a job is handed to Ray Jobs only when the cluster has
room for it, in order of submission; a job that could never fit is refused at submit.

Ray Jobs starts every submitted driver at once, and Ray then queues what the drivers ask for.
Handing it twenty jobs on a small cluster gave twenty drivers whose training workers held the CPUs
their own data tasks needed: nothing progressed. So the service keeps jobs `queued` in its store
and submits the oldest one when, by Ray's own view of the cluster's resources (or the maximum an
autoscaler may reach, LEOCLR_CLUSTER_MAX_RESOURCES), what it asks for (`job_resources`, the numbers
the drivers size a local cluster with) fits beside the jobs already handed over, and fewer than
LEOCLR_MAX_RUNNING_JOBS run. It schedules nothing itself: placement stays Ray's.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from leoclr_core.spec.resources import job_resources
from leoclr_core.spec.models import SpecError, parse_spec

from service.runner import Runner
from service.store import Job, JobStore

log = logging.getLogger(__name__)

SUBMIT_TIMEOUT_S = 300.0  # how long Ray may refuse a job it answers for (a head still starting) before it fails
CAPACITY_TTL_S = 5.0  # Ray's resource totals are asked for at most this often


def _explain(spec: Any, resource: str) -> str:
    """Which fields make up what the job asks for, so a refusal names what to change."""
    sc = spec.base.scaling if spec.kind == "tune" else spec.scaling
    if spec.kind == "embed":
        if resource == "GPU":
            return f"replicas {spec.replicas} x scaling.gpus_per_worker {sc.gpus_per_worker:g}"
        return (f"replicas {spec.replicas} x scaling.cpus_per_worker {sc.cpus_per_worker:g}, plus "
                f"scaling.data_workers {sc.data_workers} x scaling.data_cpus_per_worker {sc.data_cpus_per_worker:g}, "
                "plus 1 for Ray Data's reads and the writer")
    if resource == "GPU":
        parts = f"scaling.num_workers {sc.num_workers} x scaling.gpus_per_worker {sc.gpus_per_worker:g}"
    else:
        parts = f"scaling.num_workers {sc.num_workers} x scaling.cpus_per_worker {sc.cpus_per_worker:g}"
        if spec.kind != "evaluate":
            parts += (f", plus scaling.data_workers {sc.data_workers} x scaling.data_cpus_per_worker "
                      f"{sc.data_cpus_per_worker:g} when CPU workers make the views, plus 1 for Ray Data's reads")
    if spec.kind == "tune":
        return f"max_concurrent_trials {spec.max_concurrent_trials} trials of base.({parts})"
    return parts


class Admission:
    """`ready`: True when jobs may start; False while something every job's driver relies on is
    still being prepared (the tracking store's schema); or a sentence saying why they cannot start
    now (the tracking server does not answer), which each waiting job's error then says. Jobs wait
    `queued` until it is True."""

    def __init__(self, runner: Runner, max_running: int | None = None,
                 max_resources: dict[str, float] | None = None,
                 ready: Callable[[], bool | str] = lambda: True):
        self.runner, self.max_running, self.max_resources, self.ready = runner, max_running, max_resources, ready
        self.lock = threading.Lock()  # the route and the reconcile loop both admit: one at a time
        self._capacity: tuple[float, dict[str, float] | None] = (-CAPACITY_TTL_S, None)
        self._refused_since: dict[str, float] = {}  # job id -> when Ray first refused its submission

    def capacity(self) -> dict[str, float] | None:
        """What the cluster can hold (None: Ray cannot be asked now)."""
        if self.max_resources is not None:
            return self.max_resources
        when, totals = self._capacity
        if time.monotonic() - when < CAPACITY_TTL_S and totals is not None:
            return totals
        try:
            totals = self.runner.cluster_resources()
        except Exception as exc:  # noqa: BLE001 - Ray unreachable: no answer, not an error of the job
            log.debug("cluster resources: %s", exc)
            return None
        if not totals.get("CPU"):  # a head that has just started has no node registered yet
            return None
        self._capacity = (time.monotonic(), totals)
        return totals

    def limit(self, capacity: dict[str, float]) -> int:
        return self.max_running or max(1, int(capacity.get("CPU", 0) // 2))

    def refusal(self, spec: Any) -> str | None:
        """Why the job can never run on this cluster, or None (also when Ray cannot be asked now:
        the gate checks again before it hands the job over)."""
        capacity = self.capacity()
        if capacity is None:
            return None
        need = job_resources(spec)
        for resource, amount in need.items():
            have = capacity.get(resource, 0.0)
            if amount > have + 1e-9:
                where = "LEOCLR_CLUSTER_MAX_RESOURCES" if self.max_resources is not None else "Ray reports"
                return (f"the job asks for {amount:g} {resource}s ({_explain(spec, resource)}), but the cluster "
                        f"has {have:g} ({where}); lower these fields or add nodes")
        return None

    def admit(self, store: JobStore, reachable: bool = True) -> list[Job]:
        """Hand the oldest waiting jobs to Ray while they fit; returns the jobs whose state changed.
        Strictly in order: a job that does not fit yet holds back the ones behind it."""
        if not reachable:
            return []
        with self.lock:
            jobs = store.unfinished()
            handed = [j for j in jobs if j.submission_id]
            waiting = sorted((j for j in jobs if not j.submission_id), key=lambda j: (_aware(j.created_at), j.id))
            if not waiting:
                return []
            ready = self.ready()
            if ready is not True:
                return _waiting(store, waiting, ready) if isinstance(ready, str) else []
            capacity = self.capacity()
            if capacity is None:
                return []
            used: dict[str, float] = {}
            for job in handed:
                for resource, amount in _needs(job).items():
                    used[resource] = used.get(resource, 0.0) + amount
            changed = []
            for job in waiting:
                try:
                    spec = parse_spec(job.spec)
                except SpecError as exc:  # a row an older version accepted under looser rules
                    changed.append(_fail(store, job, f"the stored spec is not valid now: {exc}"))
                    continue
                reason = self.refusal(spec)
                if reason is not None:
                    # Accepted while Ray could not be asked, or the cluster is smaller now than at
                    # submit (a node restarting, an autoscaler's nodes not up yet): it waits, saying why.
                    waiting_for = f"waiting: larger than the cluster is now: {reason}"
                    if job.error != waiting_for:
                        changed.append(store.update(job.id, error=waiting_for))
                    break
                if job.error and job.error.startswith("waiting: "):
                    job = store.update(job.id, error=None)
                need = job_resources(spec)
                fits = all(used.get(r, 0.0) + a <= capacity.get(r, 0.0) + 1e-9 for r, a in need.items())
                if len(handed) >= self.limit(capacity) or not fits:
                    break
                done = self._submit(store, job)
                changed.append(done)
                if not done.submission_id:
                    break  # Ray refused it: the ones behind it wait their turn
                handed.append(done)
                for resource, amount in need.items():
                    used[resource] = used.get(resource, 0.0) + amount
            return changed

    def _submit(self, store: JobStore, job: Job) -> Job:
        try:
            submission_id = self.runner.submit(job.id, job.spec)
        except Exception as exc:  # noqa: BLE001 - kept, with the reason, never dropped
            if "already exists" in str(exc):  # an earlier try got through; its answer did not
                return store.update(job.id, submission_id=f"leoclr-{job.id}", error=None)
            first = self._refused_since.setdefault(job.id, time.monotonic())
            if time.monotonic() - first > SUBMIT_TIMEOUT_S:
                self._refused_since.pop(job.id, None)
                return _fail(store, job, f"submission to Ray failed: {exc}")
            return store.update(job.id, error=f"submission to Ray pending (will retry): {exc}")
        self._refused_since.pop(job.id, None)
        return store.update(job.id, submission_id=submission_id, error=None)


def _waiting(store: JobStore, jobs: list[Job], reason: str) -> list[Job]:
    """Every waiting job's error says why none can start (cleared when one is handed over)."""
    error = f"waiting: {reason}"
    return [store.update(job.id, error=error) for job in jobs if job.error != error]


def _fail(store: JobStore, job: Job, error: str) -> Job:
    return store.finish(job.id, "failed", error=error) or store.get(job.id) or job


def _needs(job: Job) -> dict[str, float]:
    try:
        return job_resources(parse_spec(job.spec))
    except Exception:  # noqa: BLE001 - a row written by an older version: count it as one CPU
        return {"CPU": 1.0}


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)  # SQLite gives naive datetimes back
