"""The REST API's routes and job store, with a stand-in for Ray Jobs (one test per outcome)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings

SPEC = {"kind": "pretrain", "name": "api-demo", "data": {"num_images": 512}, "loss": {"queue_size": 128},
        "optim": {"batch_size": 64}}


class FakeRunner:
    def __init__(self, fail: bool = False):
        self.submitted, self.stopped, self.fail, self.state = [], [], fail, "running"

    def submit(self, job_id, spec):
        if self.fail:
            raise ConnectionError("cluster unreachable")
        self.submitted.append((job_id, spec))
        return f"leoclr-{job_id}"

    def status(self, submission_id):
        return self.state

    def stop(self, submission_id):
        self.stopped.append(submission_id)

    def logs(self, submission_id):
        return ""


@pytest.fixture()
def make_client(tmp_path):
    def make(runner=None, **settings):
        s = ServiceSettings(data_dir=tmp_path, api_token="secret-token", **settings)
        return TestClient(create_app(s, runner if runner is not None else FakeRunner()))
    return make


AUTH = {"Authorization": "Bearer secret-token"}


def test_submit_stores_and_submits_a_valid_spec(make_client):
    runner = FakeRunner()
    with make_client(runner) as c:
        r = c.post("/v1/jobs", json=SPEC, headers=AUTH)
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["status"] == "queued" and job["kind"] == "pretrain" and job["spec"]["loss"]["queue_size"] == 128
        assert runner.submitted[0][0] == job["id"]
        assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["status"] == "running"


def test_an_invalid_spec_is_refused_naming_the_field(make_client):
    with make_client() as c:
        r = c.post("/v1/jobs", json={**SPEC, "optim": {"lr": -1}}, headers=AUTH)
        assert r.status_code == 422 and "optim.lr" in r.json()["detail"]


def test_an_unknown_kind_is_refused(make_client):
    with make_client() as c:
        r = c.post("/v1/jobs", json={**SPEC, "kind": "train-everything"}, headers=AUTH)
        assert r.status_code == 422 and "unknown kind" in r.json()["detail"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"a string"'])
def test_malformed_or_non_object_bodies_are_422(make_client, body):
    with make_client() as c:
        r = c.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 422


def test_a_huge_body_is_413(make_client):
    with make_client(max_body_bytes=1000) as c:
        r = c.post("/v1/jobs", json={**SPEC, "name": "x", "pad": "y" * 5000}, headers=AUTH)
        assert r.status_code == 413


def test_every_job_route_needs_the_token_but_health_does_not(make_client):
    with make_client() as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.post("/v1/jobs", json=SPEC).status_code == 401
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/jobs/abc").status_code == 401


def test_unknown_job_is_404_and_cancel_twice_is_409(make_client):
    runner = FakeRunner()
    with make_client(runner) as c:
        assert c.get("/v1/jobs/nope", headers=AUTH).status_code == 404
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        r = c.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH)
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert runner.stopped == [f"leoclr-{job['id']}"]
        assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH).status_code == 409


def test_an_idempotency_key_returns_the_same_job(make_client):
    runner = FakeRunner()
    with make_client(runner) as c:
        h = {**AUTH, "Idempotency-Key": "abc-123"}
        a = c.post("/v1/jobs", json=SPEC, headers=h)
        b = c.post("/v1/jobs", json=SPEC, headers=h)
        assert (a.status_code, b.status_code) == (201, 200) and a.json()["id"] == b.json()["id"]
        assert len(runner.submitted) == 1


def test_a_refused_submission_stays_queued_then_fails_with_the_reason(make_client, monkeypatch):
    import service.reconcile as reconcile

    runner = FakeRunner(fail=True)
    with make_client(runner) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        assert job["status"] == "queued" and "cluster unreachable" in job["error"]
        monkeypatch.setattr(reconcile, "SUBMIT_TIMEOUT_S", -1.0)  # its time to reach Ray is up
        reconcile.reconcile_once(c.app.state.store, runner)
        failed = c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()
        assert failed["status"] == "failed" and "cluster unreachable" in failed["error"]


def test_a_queued_job_is_submitted_once_ray_accepts(make_client):
    import service.reconcile as reconcile

    runner = FakeRunner(fail=True)
    with make_client(runner) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        runner.fail = False
        reconcile.reconcile_once(c.app.state.store, runner)
        assert runner.submitted[0][0] == job["id"]
        assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["error"] is None


def test_list_filters_and_pages(make_client):
    with make_client() as c:
        for i in range(3):
            c.post("/v1/jobs", json={**SPEC, "name": f"j{i}"}, headers=AUTH)
        page = c.get("/v1/jobs", params={"limit": 2, "kind": "pretrain"}, headers=AUTH).json()
        assert page["total"] == 3 and len(page["items"]) == 2
        assert c.get("/v1/jobs", params={"kind": "evaluate"}, headers=AUTH).json()["total"] == 0
        assert c.get("/v1/jobs", params={"status": "bogus"}, headers=AUTH).status_code == 422


def test_jobs_survive_a_restart_of_the_api(make_client):
    with make_client() as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
    with make_client() as c:  # a new app on the same database
        assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["name"] == "api-demo"


def test_a_generated_token_is_private(tmp_path):
    from service.auth import ensure_token

    token = ensure_token(None, tmp_path / "api-token")
    assert len(token) >= 32 and (tmp_path / "api-token").stat().st_mode & 0o777 == 0o600
    assert ensure_token(None, tmp_path / "api-token") == token


def test_the_api_process_never_imports_torch():
    code = "import sys, service.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_reconcile_follows_ray_to_the_end_and_keeps_the_result(tmp_path):
    from service.reconcile import reconcile_once
    from service.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    runner = FakeRunner()
    job, _ = store.create("pretrain", "r", SPEC)
    store.update(job.id, submission_id=runner.submit(job.id, SPEC))
    assert reconcile_once(store, runner) == 1 and store.get(job.id).status == "running"
    assert reconcile_once(store, runner) == 0
    runner.state = "succeeded"
    runner.logs = lambda sid: 'epoch 1/1 ...\n{"registry_uri": "models:/x@candidate", "knn_top1": 40.0}\n'
    assert reconcile_once(store, runner) == 1
    done = store.get(job.id)
    assert done.status == "succeeded" and done.result["registry_uri"] == "models:/x@candidate"
    assert store.unfinished() == []


def test_reading_a_job_that_just_finished_records_its_result(make_client):
    runner = FakeRunner()
    with make_client(runner) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        runner.state = "succeeded"
        runner.logs = lambda sid: '{"registry_uri": "models:/y@candidate"}\n'
        done = c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()
        assert done["status"] == "succeeded" and done["result"]["registry_uri"] == "models:/y@candidate"
