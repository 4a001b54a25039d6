"""The REST API's routes and job store, with a stand-in for Ray Jobs (one test per outcome)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ServiceSettings

from .fakes import AUTH, SPEC, FakeRunner, make_client  # noqa: F401 - make_client is a fixture


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
    import service.admission as admission
    import service.reconcile as reconcile

    runner = FakeRunner(fail=True)
    with make_client(runner) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        assert job["status"] == "queued" and "cluster unreachable" in job["error"]
        monkeypatch.setattr(admission, "SUBMIT_TIMEOUT_S", -1.0)  # its time to reach Ray is up
        reconcile.reconcile_once(c.app.state.store, runner, admission.Admission(runner))
        failed = c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()
        assert failed["status"] == "failed" and "cluster unreachable" in failed["error"]


def test_a_queued_job_is_submitted_once_ray_accepts(make_client):
    import service.admission as admission
    import service.reconcile as reconcile

    runner = FakeRunner(fail=True)
    with make_client(runner) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        runner.fail = False
        reconcile.reconcile_once(c.app.state.store, runner, admission.Admission(runner))
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


def test_a_huge_chunked_body_without_a_length_is_413(make_client):
    def chunks():
        yield b'{"kind": "pretrain", "pad": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    with make_client(max_body_bytes=1000) as c:
        r = c.post("/v1/jobs", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 413 and "1000 bytes" in r.json()["detail"]


def test_a_wrong_type_is_422_naming_the_field(make_client):
    with make_client() as c:
        r = c.post("/v1/jobs", json={**SPEC, "optim": {"epochs": "many"}}, headers=AUTH)
        assert r.status_code == 422 and "optim.epochs" in r.json()["detail"]


@pytest.mark.parametrize("field, spec", [
    ("data.path", {"data": {"source": "imagefolder", "path": "/etc"}}),
    ("data.path", {"data": {"source": "imagefolder", "path": "{home}/datasets/../../etc"}}),
    ("data.path", {"data": {"source": "imagefolder", "path": "file:///etc"}}),
    ("output_dir", {"output_dir": "/tmp/elsewhere"}),
    ("checkpoint.storage_path", {"checkpoint": {"storage_path": "/var/tmp/ckpt"}}),
])
def test_a_spec_may_not_reach_outside_the_data_roots(make_client, tmp_path, field, spec):
    spec = {k: {kk: vv.replace("{home}", str(tmp_path)) if isinstance(vv, str) else vv for kk, vv in v.items()}
            if isinstance(v, dict) else v for k, v in spec.items()}
    runner = FakeRunner()
    with make_client(runner) as c:
        r = c.post("/v1/jobs", json={**SPEC, **spec, "data": {**SPEC["data"], **spec.get("data", {})}}, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"].startswith(field), r.text
        assert runner.submitted == [] and c.get("/v1/jobs", headers=AUTH).json()["total"] == 0


def test_data_under_a_configured_root_is_accepted(make_client, tmp_path):
    (tmp_path / "imgs").mkdir()
    with make_client(data_roots=str(tmp_path / "imgs")) as c:
        data = {**SPEC["data"], "source": "imagefolder", "path": str(tmp_path / "imgs")}
        assert c.post("/v1/jobs", json={**SPEC, "data": data}, headers=AUTH).status_code == 201
        ev = {"kind": "evaluate", "name": "ev", "encoder": {"model_uri": "/etc/model"}}
        r = c.post("/v1/jobs", json=ev, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"].startswith("encoder.model_uri")


def test_cancel_of_a_job_that_ray_already_finished_is_409_with_its_real_status(make_client):
    runner = FakeRunner()
    with make_client(runner) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        runner.state = "succeeded"
        r = c.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH)
        assert r.status_code == 409 and "succeeded" in r.json()["detail"]
        assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["status"] == "succeeded"


def test_logs_tail_and_follow(make_client):
    runner = FakeRunner()
    runner.log_text = "".join(f"line {i}\n" for i in range(10))
    with make_client(runner) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        r = c.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 3}, headers=AUTH)
        assert r.status_code == 200 and r.text == "line 7\nline 8\nline 9\n"
        with c.stream("GET", f"/v1/jobs/{job['id']}/logs", params={"follow": True}, headers=AUTH) as s:
            assert s.status_code == 200 and "".join(s.iter_text()) == runner.log_text
        assert c.get("/v1/jobs/nope/logs", headers=AUTH).status_code == 404


def test_logs_of_a_job_not_yet_on_ray_is_409(make_client):
    with make_client(FakeRunner(fail=True)) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        r = c.get(f"/v1/jobs/{job['id']}/logs", headers=AUTH)
        assert r.status_code == 409 and "not reached Ray" in r.json()["detail"]


def _mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_progress_and_history_come_from_the_jobs_mlflow_run(make_client, tmp_path):
    from leoclr_core import contract

    uri, ml = _mlflow(tmp_path)
    runner = FakeRunner()
    with make_client(runner, mlflow_tracking_uri=uri) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["progress"] is None  # no run yet
        assert c.get(f"/v1/jobs/{job['id']}/metrics", headers=AUTH).status_code == 404
        exp = ml.create_experiment(SPEC["name"])
        other = ml.create_run(exp, tags={contract.TAG_SERVICE_JOB: "someone-else"}).info.run_id
        ml.log_metric(other, contract.M_STEP, 99)
        run = ml.create_run(exp, tags={contract.TAG_SERVICE_JOB: job["id"]}).info.run_id
        for step in (10, 20):
            ml.log_metric(run, contract.M_STEP, step, step=step)
            ml.log_metric(run, contract.M_LOSS, 5.0 - step / 10, step=step)
        for k, v in {contract.M_TOTAL: 80, contract.M_EPOCH: 3, contract.M_EPOCHS: 8, contract.M_IPS: 1500.0,
                     contract.M_ETA: 42.0, contract.M_KNN: 31.5}.items():
            ml.log_metric(run, k, v, step=20)
        p = c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["progress"]
        assert (p["step"], p["total_steps"], p["fraction"], p["epoch"], p["epochs"]) == (20, 80, 0.25, 3, 8)
        assert (p["loss"], p["instances_per_s"], p["eta_seconds"], p["knn_top1"]) == (3.0, 1500.0, 42.0, 31.5)
        assert p["mlflow_run_id"] == run and p["mlflow_run_url"] == f"runs:/{run}"
        h = c.get(f"/v1/jobs/{job['id']}/metrics", params={"key": contract.M_LOSS}, headers=AUTH).json()
        assert [(x["step"], x["value"]) for x in h["metrics"][contract.M_LOSS]] == [(10, 4.0), (20, 3.0)]
        r = c.get(f"/v1/jobs/{job['id']}/metrics", params={"key": "nope"}, headers=AUTH)
        assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_models_list_versions_with_their_metrics_and_an_alias_moves(make_client, tmp_path):
    from leoclr_core import contract

    uri, ml = _mlflow(tmp_path)
    ml.create_registered_model("enc")
    for i in (1, 2):
        v = ml.create_model_version("enc", source=f"{tmp_path}/m{i}", run_id=None)
        ml.set_model_version_tag("enc", v.version, "metric.knn_top1", str(50.0 + i))
        ml.set_model_version_tag("enc", v.version, contract.TAG_SERVICE_JOB, f"job{i}")
    ml.set_registered_model_alias("enc", "candidate", "2")
    with make_client(mlflow_tracking_uri=uri) as c:
        [model] = c.get("/v1/models", headers=AUTH).json()["items"]
        assert model["name"] == "enc" and model["aliases"] == {"candidate": "2"}
        latest = model["versions"][0]
        assert (latest["version"], latest["job_id"], latest["metrics"]) == ("2", "job2", {"knn_top1": 52.0})
        assert latest["uri"] == "models:/enc/2" and latest["aliases"] == ["candidate"]
        r = c.post("/v1/models/enc/aliases", json={"alias": "champion", "version": "1"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["aliases"] == {"candidate": "2", "champion": "1"}
        assert str(ml.get_model_version_by_alias("enc", "champion").version) == "1"
        assert c.post("/v1/models/enc/aliases", json={"alias": "champion", "version": "9"},
                      headers=AUTH).status_code == 404
        assert c.post("/v1/models/nope/aliases", json={"alias": "champion", "version": "1"},
                      headers=AUTH).status_code == 404
        assert c.post("/v1/models/enc/aliases", json={"alias": "bad alias!", "version": "1"},
                      headers=AUTH).status_code == 422
        assert c.post("/v1/models/enc/aliases", json={"alias": "latest", "version": "1"},
                      headers=AUTH).status_code == 422
        assert c.get("/v1/models", headers={"Authorization": "Bearer x"}).status_code == 401


def test_prometheus_metrics_count_requests_and_jobs(make_client):
    with make_client() as c:
        c.post("/v1/jobs", json=SPEC, headers=AUTH)
        c.get("/v1/jobs/nope", headers=AUTH)
        assert c.get("/metrics").status_code == 401
        text = c.get("/metrics", headers=AUTH).text
        assert 'leoclr_jobs{kind="pretrain",status="queued"} 1.0' in text
        assert 'leoclr_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
        assert "process_cpu_seconds_total " in text  # what bench.api_load reads a request's cost from


@pytest.fixture()
def cli(make_client, monkeypatch):
    """`leoclr` client commands against the app, through the real ApiClient and a FakeRunner."""
    from typer.testing import CliRunner

    import service.client
    from leoclr_core.cli import app

    runner = FakeRunner()
    with make_client(runner) as c:
        c.headers.update(AUTH)
        real = service.client.ApiClient
        monkeypatch.setattr(service.client, "ApiClient", lambda *a, **k: real(http=c))
        yield lambda *args: CliRunner().invoke(app, list(args)), runner


def test_client_commands_submit_status_cancel(cli, tmp_path):
    import json

    invoke, runner = cli
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(SPEC))
    r = invoke("submit", str(spec), "--set", "optim.epochs=3")
    assert r.exit_code == 0, r.output
    job_id = r.stdout.strip().splitlines()[-1]
    assert runner.submitted[0][0] == job_id and runner.submitted[0][1]["optim"]["epochs"] == 3
    r = invoke("status", job_id)
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "running"
    assert invoke("cancel", job_id).exit_code == 0
    r = invoke("cancel", job_id)
    assert r.exit_code == 1 and "409" in r.output and "already cancelled" in r.output
    r = invoke("status", "no-such-job")
    assert r.exit_code == 1 and "404" in r.output


def test_client_without_a_token_or_a_reachable_api_says_so(tmp_path, monkeypatch):
    from service.client import ApiClient, ApiError

    monkeypatch.delenv("LEOCLR_API_TOKEN", raising=False)
    with pytest.raises(ApiError, match="no API token"):
        ApiClient(settings=ServiceSettings(data_dir=tmp_path / "empty"))
    client = ApiClient(url="http://127.0.0.1:9", token="t", settings=ServiceSettings(data_dir=tmp_path))
    with pytest.raises(ApiError, match="cannot reach the API at http://127.0.0.1:9"):
        client.jobs()


def test_an_unfinished_jobs_view_is_reused_for_a_second(tmp_path):
    runner = FakeRunner()
    calls = []
    status = runner.status
    runner.status = lambda sid: calls.append(sid) or status(sid)
    s = ServiceSettings(data_dir=tmp_path, api_token="secret-token")
    with TestClient(create_app(s, runner, reconcile_interval=3600, fresh_s=60)) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        for _ in range(5):
            assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["status"] == "running"
        assert len(calls) <= 2  # the first read (and at most one background pass), not five
        assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH).status_code == 200
        assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["status"] == "cancelled"


TUNE = {"kind": "tune", "name": "search-api", "base": SPEC, "metric": "knn_top1",
        "space": {"optim.lr": {"type": "choice", "values": [0.01, 0.1]}}}


def test_a_tune_job_shows_its_trials_and_the_best_so_far(make_client, tmp_path):
    from leoclr_core import contract

    uri, ml = _mlflow(tmp_path)
    runner = FakeRunner()
    with make_client(runner, mlflow_tracking_uri=uri) as c:
        r = c.post("/v1/jobs", json=TUNE, headers=AUTH)
        assert r.status_code == 201 and r.json()["kind"] == "tune", r.text
        job = r.json()
        exp = ml.create_experiment("search-api")
        parent = ml.create_run(exp, tags={contract.TAG_SERVICE_JOB: job["id"]}).info.run_id
        trials = [("trial-000", "FINISHED", 41.0, None), ("trial-001", "KILLED", 20.0, "true"),
                  ("trial-002", "RUNNING", 44.5, None), ("trial-003", "FAILED", None, None)]
        for name, st, knn, stopped in trials:
            tags = {"mlflow.parentRunId": parent, contract.TAG_TRIAL: name}
            if stopped:
                tags[contract.TAG_STOPPED_EARLY] = stopped
            run = ml.create_run(exp, tags=tags).info.run_id
            ml.log_param(run, "optim.lr", "0.1" if name == "trial-002" else "0.01")
            if knn is not None:
                ml.log_metric(run, "knn_top1", knn)
            if st != "RUNNING":
                ml.set_terminated(run, st)
        t = c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["progress"]["trials"]
        assert (t["total"], t["finished"], t["running"], t["stopped_early"], t["failed"]) == (4, 1, 1, 1, 1)
        assert t["best"]["trial"] == "trial-002" and t["best"]["value"] == 44.5
        assert t["best"]["params"] == {"optim.lr": "0.1"}


def test_a_tune_job_may_not_search_its_way_out_of_the_data_roots(make_client, tmp_path):
    with make_client() as c:
        spec = {**TUNE, "base": {**SPEC, "data": {**SPEC["data"], "source": "imagefolder", "path": "/tmp"}}}
        r = c.post("/v1/jobs", json=spec, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"].startswith("data.path"), r.text
        spec = {**TUNE, "space": {"data.path": {"type": "choice", "values": ["/etc"]}},
                "base": {**SPEC, "data": {**SPEC["data"], "source": "imagefolder",
                                          "path": str(tmp_path / "datasets" / "ok")}}}
        r = c.post("/v1/jobs", json=spec, headers=AUTH)
        assert r.status_code == 422 and "space.data.path" in r.json()["detail"], r.text


def test_the_embedded_head_gets_an_auth_token_on_a_machine_where_ray_never_ran(tmp_path, monkeypatch):
    # `ray start` with token auth refuses to start without one (ray.init would make its own), so
    # `make run` on a fresh machine failed before any test had run Ray there.
    from pathlib import Path

    from service.cluster import ensure_auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    ray = str(Path(sys.executable).with_name("ray"))
    token = tmp_path / ".ray" / "auth_token"

    ensure_auth_token(ray)
    first = token.read_text().strip()
    assert len(first) >= 32 and token.stat().st_mode & 0o777 == 0o600
    ensure_auth_token(ray)  # an existing token is kept: the running head and its clients share it
    assert token.read_text().strip() == first
