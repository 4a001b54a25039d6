"""The REST API over the admission gate and Ray's health: what a client sees when the cluster is
too small, full, or gone (a stand-in for Ray Jobs; one test per outcome)."""

from __future__ import annotations

from service.reconcile import reconcile_once
from tests.unit.fakes import AUTH, SPEC, FakeRunner, make_client  # noqa: F401 - make_client is a fixture


class SmallCluster(FakeRunner):
    def __init__(self, cpus: float = 4.0, up: bool = True):
        super().__init__()
        self.cpus, self.up = cpus, up

    def ping(self):
        if not self.up:
            raise ConnectionError("Failed to connect to Ray at address: http://127.0.0.1:1")

    def cluster_resources(self):
        self.ping()
        return {"CPU": self.cpus}

    def stop(self, submission_id):
        self.ping()
        return super().stop(submission_id)


TWO_CPUS = {**SPEC, "augment": {"device": "gpu"}}  # views on the worker: 1 + 1 CPUs


def test_a_spec_larger_than_the_cluster_is_422_naming_the_fields_and_numbers(make_client):
    runner = SmallCluster(cpus=4)
    with make_client(runner) as c:
        r = c.post("/v1/jobs", json={**SPEC, "scaling": {"num_workers": 100}}, headers=AUTH)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "scaling.num_workers 100" in detail and "has 4" in detail and "CPUs" in detail
        assert c.get("/v1/jobs", headers=AUTH).json()["total"] == 0 and runner.submitted == []


def test_jobs_beyond_the_running_limit_wait_queued_in_order(make_client):
    runner = SmallCluster(cpus=64)
    with make_client(runner, max_running_jobs=2) as c:
        ids = [c.post("/v1/jobs", json={**TWO_CPUS, "name": f"j{i}"}, headers=AUTH).json()["id"] for i in range(4)]
        assert [job_id for job_id, _ in runner.submitted] == ids[:2]
        assert [c.get(f"/v1/jobs/{i}", headers=AUTH).json()["status"] for i in ids] == [
            "running", "running", "queued", "queued"]


def test_readyz_is_503_with_the_reason_while_ray_does_not_answer(make_client):
    runner = SmallCluster(up=False)
    with make_client(runner) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "does not answer" in r.json()["detail"]
        runner.up = True
        app_health = c.app.state.health
        app_health.check(runner)
        assert c.get("/readyz").status_code == 200


def test_a_job_accepted_while_ray_is_down_waits_queued(make_client):
    runner = SmallCluster(up=False)
    with make_client(runner) as c:
        r = c.post("/v1/jobs", json=TWO_CPUS, headers=AUTH)
        assert r.status_code == 201 and r.json()["status"] == "queued" and runner.submitted == []


def test_cancelling_a_job_queued_in_the_service_never_hands_it_to_ray(make_client):
    runner = SmallCluster(cpus=64)
    with make_client(runner, max_running_jobs=1) as c:
        first = c.post("/v1/jobs", json={**TWO_CPUS, "name": "first"}, headers=AUTH).json()
        second = c.post("/v1/jobs", json={**TWO_CPUS, "name": "second"}, headers=AUTH).json()
        assert c.get(f"/v1/jobs/{second['id']}", headers=AUTH).json()["status"] == "queued"
        r = c.post(f"/v1/jobs/{second['id']}/cancel", headers=AUTH)
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        runner.state = "succeeded"  # the first ends: the gate has room again
        reconcile_once(c.app.state.store, runner, c.app.state.admission)
        assert c.get(f"/v1/jobs/{first['id']}", headers=AUTH).json()["status"] == "succeeded"
        assert [job_id for job_id, _ in runner.submitted] == [first["id"]]
        assert runner.stopped == []


def test_cancel_while_ray_is_unreachable_is_503_and_the_job_is_kept(make_client):
    runner = SmallCluster(cpus=64)
    with make_client(runner) as c:
        job = c.post("/v1/jobs", json=TWO_CPUS, headers=AUTH).json()
        runner.up = False
        r = c.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH)
        assert r.status_code == 503 and "stop" in r.json()["detail"]
        assert c.app.state.store.get(job["id"]).status not in ("cancelled",)
