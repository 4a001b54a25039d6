"""The reconcile loop and the admission gate, over a real job store (SQLite and PostgreSQL) and a
stand-in for Ray Jobs whose cluster size, reachability and memory of jobs the tests set."""

from __future__ import annotations

import time

import pytest

from leoclr_core.spec.models import parse_spec
from service.admission import Admission
from service.reconcile import RayHealth, reconcile_once
from service.runner import JobGone
from service.store import JobStore
from service.tracking import LazyTracking, Unavailable

from .fakes import SPEC, FakeRunner, driver_run, mlflow_store

TINY = {"kind": "pretrain", "name": "tiny", "data": {"num_images": 256}, "loss": {"queue_size": 64},
        "optim": {"batch_size": 32}, "augment": {"device": "gpu"}}  # views on the worker: 2 CPUs a job


class Cluster:
    """Ray Jobs as the service sees it: jobs it knows, whether it answers, what its nodes hold."""

    def __init__(self, cpus: float = 4.0):
        self.resources = {"CPU": cpus}
        self.jobs: dict[str, str] = {}
        self.up = True
        self.order: list[str] = []

    def _answer(self) -> None:
        if not self.up:
            raise ConnectionError("Failed to connect to Ray at address: http://127.0.0.1:1")

    def submit(self, job_id, spec):
        self._answer()
        self.jobs[f"leoclr-{job_id}"] = "running"
        self.order.append(job_id)
        return f"leoclr-{job_id}"

    def status(self, submission_id):
        self._answer()
        if submission_id not in self.jobs:
            raise JobGone(f"Job {submission_id} does not exist.")
        return self.jobs[submission_id]

    def stop(self, submission_id):
        return True

    def logs(self, submission_id):
        return "epoch 1/1\n"

    def ping(self):
        self._answer()

    def cluster_resources(self):
        self._answer()
        return dict(self.resources)

    def restart(self):
        """A new head: up again, with no record of the old one's jobs."""
        self.jobs, self.up = {}, True


@pytest.fixture()
def store(job_database):
    store = JobStore(job_database)
    yield store
    store.close()


def add(store, n, spec=TINY):
    jobs = []
    for i in range(n):
        job, _ = store.create("pretrain", f"job-{i}", parse_spec({**spec, "name": f"job-{i}"}).model_dump(mode="json"))
        jobs.append(job)
        time.sleep(0.002)  # distinct creation times: the order of submission is the test
    return jobs


def statuses(store, jobs):
    return [store.get(j.id).status for j in jobs]


def test_jobs_beyond_what_fits_wait_queued_and_start_in_order_as_others_finish(store):
    ray = Cluster(cpus=4)  # two 2-CPU jobs fit; the default limit is also 4 // 2 = 2
    gate = Admission(ray)
    jobs = add(store, 5)
    results = {jobs[1].id: {"knn_top1": 50.0}}  # what the second job's driver logged to MLflow
    reconcile_once(store, ray, gate)
    assert statuses(store, jobs) == ["running", "running", "queued", "queued", "queued"]
    ray.jobs[f"leoclr-{jobs[1].id}"] = "succeeded"
    reconcile_once(store, ray, gate, read_result=lambda job: results.get(job.id))
    assert statuses(store, jobs) == ["running", "succeeded", "running", "queued", "queued"]
    assert store.get(jobs[1].id).result == {"knn_top1": 50.0}
    for _ in range(3):
        for j in jobs:
            if ray.jobs.get(f"leoclr-{j.id}") == "running":
                ray.jobs[f"leoclr-{j.id}"] = "succeeded"
        reconcile_once(store, ray, gate)
    reconcile_once(store, ray, gate)
    assert statuses(store, jobs) == ["succeeded"] * 5
    assert ray.order == [j.id for j in jobs]  # handed to Ray in the order they were submitted


def test_the_running_limit_holds_jobs_that_would_fit(store):
    ray = Cluster(cpus=64)
    jobs = add(store, 3)
    reconcile_once(store, ray, Admission(ray, max_running=1))
    assert statuses(store, jobs) == ["running", "queued", "queued"]


def test_no_job_goes_to_ray_before_the_tracking_store_is_ready(store):
    ray = Cluster(cpus=64)
    ready = False
    gate = Admission(ray, ready=lambda: ready)
    jobs = add(store, 2)
    reconcile_once(store, ray, gate)
    assert statuses(store, jobs) == ["queued", "queued"] and ray.order == []
    ready = True
    reconcile_once(store, ray, gate)
    assert statuses(store, jobs) == ["running", "running"]


def test_the_service_creates_a_fresh_tracking_databases_schema_once_before_any_driver(tmp_path):
    # Two drivers creating the schema of one fresh SQLite database at once: one fails ("table ...
    # already exists"). The service makes it first, off the request path.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lazy = LazyTracking(uri)
    assert lazy.store_ready() is False  # preparing, on a thread of its own
    deadline = time.monotonic() + 60
    while not lazy.store_ready():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    import sqlite3

    tables = {r[0] for r in sqlite3.connect(tmp_path / "mlflow.db").execute("select name from sqlite_master")}
    assert {"experiments", "runs", "alembic_version"} <= tables
    assert LazyTracking("http://127.0.0.1:9").store_ready() is True  # a server migrates its own database


def test_a_job_that_does_not_fit_yet_holds_back_the_ones_behind_it(store):
    ray = Cluster(cpus=4)
    big = {**TINY, "scaling": {"num_workers": 3}}  # 3 + 1 = 4 CPUs
    first = add(store, 1)
    second = add(store, 1, big)
    third = add(store, 1)
    reconcile_once(store, ray, Admission(ray, max_running=10))
    assert statuses(store, first + second + third) == ["running", "queued", "queued"]


def test_a_job_that_can_never_fit_is_refused_naming_the_fields_and_numbers():
    ray = Cluster(cpus=4)
    reason = Admission(ray).refusal(parse_spec({**TINY, "scaling": {"num_workers": 100}}))
    assert "101 CPUs" in reason and "scaling.num_workers 100" in reason and "has 4" in reason
    assert Admission(ray).refusal(parse_spec(TINY)) is None
    gpus = Admission(ray).refusal(parse_spec({**TINY, "scaling": {"use_gpu": True}}))
    assert "1 GPUs" in gpus and "scaling.gpus_per_worker 1" in gpus and "has 0" in gpus


def test_an_autoscaler_maximum_replaces_what_ray_reports_now():
    ray = Cluster(cpus=2)
    gate = Admission(ray, max_resources={"CPU": 512, "GPU": 8})
    assert gate.refusal(parse_spec({**TINY, "scaling": {"num_workers": 100}})) is None
    assert "LEOCLR_CLUSTER_MAX_RESOURCES" in gate.refusal(parse_spec({**TINY, "scaling": {"num_workers": 600}}))


def test_a_queued_job_larger_than_the_cluster_is_now_waits_saying_why_and_holds_the_queue(store):
    ray = Cluster(cpus=4)
    big, small = add(store, 1, {**TINY, "scaling": {"num_workers": 8}}) + add(store, 1)  # big: accepted while
    gate = Admission(ray)                                                               # Ray could not be asked
    reconcile_once(store, ray, gate)
    got = store.get(big.id)
    assert got.status == "queued" and got.error.startswith("waiting: larger than the cluster") and "9 CPUs" in got.error
    assert store.get(small.id).status == "queued"  # in order: it does not jump the queue
    ray.resources = {"CPU": 16}  # a node joined
    gate._capacity = (float("-inf"), None)
    reconcile_once(store, ray, gate)
    assert statuses(store, [big, small]) == ["running", "running"] and store.get(big.id).error is None


def test_a_job_ray_has_no_record_of_is_marked_lost_at_once(store):
    ray = Cluster(cpus=4)
    gate = Admission(ray)
    (job,) = add(store, 1)
    reconcile_once(store, ray, gate)
    assert store.get(job.id).status == "running"
    ray.restart()  # the head died and a new one answers
    reconcile_once(store, ray, gate)
    got = store.get(job.id)
    assert got.status == "lost" and "no record" in got.error


def test_jobs_on_an_unreachable_ray_are_lost_after_the_bound_and_queued_ones_wait(store):
    ray = Cluster(cpus=2)  # one job at a time
    gate, health = Admission(ray), RayHealth()
    running, waiting = add(store, 2)
    reconcile_once(store, ray, gate, health, lost_after_s=0.3)
    assert statuses(store, [running, waiting]) == ["running", "queued"]
    ray.up = False
    reconcile_once(store, ray, gate, health, lost_after_s=0.3)
    assert statuses(store, [running, waiting]) == ["running", "queued"] and not health.ok
    time.sleep(0.4)
    reconcile_once(store, ray, gate, health, lost_after_s=0.3)
    got = store.get(running.id)
    assert got.status == "lost" and "has not answered" in got.error
    assert store.get(waiting.id).status == "queued"
    ray.restart()
    reconcile_once(store, ray, gate, health, lost_after_s=0.3)
    assert store.get(waiting.id).status == "running" and health.ok  # the queued job went to the new head


def test_ray_refusing_a_submission_keeps_the_job_queued_with_the_reason(store):
    ray = Cluster(cpus=4)

    def refuse(job_id, spec):
        raise RuntimeError("No available agent to submit job")

    ray.submit = refuse
    (job,) = add(store, 1)
    reconcile_once(store, ray, Admission(ray))
    got = store.get(job.id)
    assert got.status == "queued" and "will retry" in got.error


def test_a_head_with_no_node_registered_yet_refuses_nothing_and_admits_nothing(store):
    ray = Cluster(cpus=0)
    ray.resources = {}
    gate = Admission(ray)
    assert gate.refusal(parse_spec(TINY)) is None
    (job,) = add(store, 1)
    reconcile_once(store, ray, gate)
    assert store.get(job.id).status == "queued"


def test_reconcile_follows_ray_to_the_end_and_keeps_the_result(tmp_path, store):
    uri, ml = mlflow_store(tmp_path)
    runner = FakeRunner()
    job, _ = store.create("pretrain", "r", SPEC)
    store.update(job.id, submission_id=runner.submit(job.id, SPEC))
    results = LazyTracking(uri).result
    assert reconcile_once(store, runner, read_result=results) == 1 and store.get(job.id).status == "running"
    assert reconcile_once(store, runner, read_result=results) == 0
    driver_run(ml, job.id, "r", {"registry_uri": "models:/x@candidate", "knn_top1": 40.0})
    runner.state = "succeeded"
    assert reconcile_once(store, runner, read_result=results) == 1
    done = store.get(job.id)
    assert done.status == "succeeded" and done.result["registry_uri"] == "models:/x@candidate"
    assert store.unfinished() == []


def test_a_job_that_ends_while_mlflow_is_down_is_recorded_finished_without_a_result(store):
    ray = Cluster(cpus=4)
    (job,) = add(store, 1)
    reconcile_once(store, ray, Admission(ray))
    ray.jobs[f"leoclr-{job.id}"] = "succeeded"

    def mlflow_down(job):
        raise Unavailable("MLflow at the tracking URI could not be read: connection refused")

    reconcile_once(store, ray, Admission(ray), read_result=mlflow_down)
    got = store.get(job.id)
    assert got.status == "succeeded" and got.result is None  # GET /v1/jobs/{id} reads it again later


def test_jobs_wait_queued_saying_why_while_the_tracking_server_does_not_answer(store):
    ray, why = Cluster(cpus=64), "the MLflow tracking server at http://127.0.0.1:9 does not answer"
    answer: str | bool = why
    gate = Admission(ray, ready=lambda: answer)
    jobs = add(store, 2)
    reconcile_once(store, ray, gate)
    assert statuses(store, jobs) == ["queued", "queued"] and ray.order == []
    assert {store.get(j.id).error for j in jobs} == {f"waiting: {why}"}
    answer = True
    reconcile_once(store, ray, gate)
    assert statuses(store, jobs) == ["running", "running"] and {store.get(j.id).error for j in jobs} == {None}


def test_a_tracking_server_that_does_not_answer_is_named_without_its_password():
    why = LazyTracking("http://user:pw@127.0.0.1:9").jobs_may_start()
    assert isinstance(why, str) and "http://***@127.0.0.1:9" in why and "pw" not in why, why
