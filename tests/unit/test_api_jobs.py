"""The job routes (routers/jobs.py) over a real job store (SQLite and PostgreSQL) and a stand-in for
Ray Jobs: submit, list, read, logs and cancel, one test per outcome a client relies on."""

from __future__ import annotations

import pytest

from .fakes import AUTH, SPEC, TUNE, FakeRunner, make_client  # noqa: F401 - make_client is a fixture


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


def test_a_spec_without_a_kind_is_a_pretrain_job(make_client):
    with make_client() as c:
        r = c.post("/v1/jobs", json={k: v for k, v in SPEC.items() if k != "kind"}, headers=AUTH)
        assert r.status_code == 201 and r.json()["kind"] == "pretrain", r.text
        r = c.post("/v1/jobs", json={"name": "no-kind", "optim": {"lr": -1}}, headers=AUTH)
        assert r.status_code == 422 and "optim.lr" in r.json()["detail"], r.text


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
    ("data.path", {"data": {"source": "imagefolder", "path": "{home}/datasets/a\u0000b"}}),
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


def test_an_evaluate_job_may_fine_tune_and_a_label_fraction_too_small_for_the_data_is_422(make_client):
    ev = {"kind": "evaluate", "name": "ft", "encoder": {"model_uri": "models:/m@candidate"}, "protocol": "finetune",
          "data": {"num_images": 1000}, "eval": {"finetune": {"label_fraction": 0.01, "epochs": 5}}}
    runner = FakeRunner()
    with make_client(runner) as c:
        r = c.post("/v1/jobs", json=ev, headers=AUTH)
        assert r.status_code == 201, r.text
        stored = r.json()["spec"]
        assert stored["protocol"] == "finetune" and stored["eval"]["finetune"]["label_fraction"] == 0.01
        too_few = {**ev, "eval": {"finetune": {"label_fraction": 0.005}}}
        r = c.post("/v1/jobs", json=too_few, headers=AUTH)
        assert r.status_code == 422 and "eval.finetune.label_fraction (0.005) gives 0.5 labelled images per class" \
            in r.json()["detail"], r.text
        r = c.post("/v1/jobs", json={**ev, "eval": {"finetune": {"label_fraction": 2}}}, headers=AUTH)
        assert r.status_code == 422 and "eval.finetune.label_fraction" in r.json()["detail"], r.text
        assert len(runner.submitted) == 1


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


def test_an_unfinished_jobs_view_is_reused_for_a_second(make_client):
    runner = FakeRunner()
    calls = []
    status = runner.status
    runner.status = lambda sid: calls.append(sid) or status(sid)
    with make_client(runner, reconcile_interval=3600, fresh_s=60) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        for _ in range(5):
            assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["status"] == "running"
        assert len(calls) <= 2  # the first read (and at most one background pass), not five
        assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH).status_code == 200
        assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["status"] == "cancelled"


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
