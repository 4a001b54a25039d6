"""The REST API keeps the promises its OpenAPI document makes: statuses, bodies, auth, races, outages.

Each test here is a defect a review of the service found (a 500, an undocumented answer, a lost
race), kept so it cannot come back.
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import jsonschema
import pytest

from leoclr_core.spec.models import KINDS
from service.store import STATUSES
from service.tracking import API_HTTP_ENV

from .fakes import AUTH, SPEC, FakeRunner, make_client  # noqa: F401 - make_client is a fixture


def _declared(doc: dict, method: str, path: str, code: int) -> dict:
    """The schema the OpenAPI document declares for this answer (fails if the status is undocumented)."""
    responses = doc["paths"][path][method]["responses"]
    assert str(code) in responses, f"{method.upper()} {path} answers {code}, which it does not document"
    schema = responses[str(code)]["content"]["application/json"]["schema"]
    return {**schema, "components": doc["components"]}


def _conforms(doc: dict, method: str, path: str, r) -> None:
    schema = _declared(doc, method, path, r.status_code)
    jsonschema.validate(r.json(), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_a_blank_or_odd_model_name_is_422_not_500(make_client):
    with make_client() as c:
        for name in ("%20", "a%00b", "-leading-dash"):
            r = c.get(f"/v1/models/{name}", headers=AUTH)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "name"], (name, r.text)
        assert c.get("/v1/models/no-such-model", headers=AUTH).status_code == 404


def test_a_page_offset_past_what_a_database_holds_is_422_not_500(make_client):
    with make_client() as c:
        r = c.get("/v1/jobs", params={"offset": "99999999999999999999"}, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "offset"], r.text
        assert c.get("/v1/jobs", params={"offset": 2**31 - 1}, headers=AUTH).json()["items"] == []


def test_both_timestamps_are_utc_aware_date_times(make_client):
    with make_client() as c:
        c.post("/v1/jobs", json=SPEC, headers=AUTH)
        doc = c.get("/openapi.json").json()
        r = c.get("/v1/jobs", headers=AUTH)
        _conforms(doc, "get", "/v1/jobs", r)
        [job] = r.json()["items"]
        r = c.get(f"/v1/jobs/{job['id']}", headers=AUTH)
        _conforms(doc, "get", "/v1/jobs/{job_id}", r)
        for view in (job, r.json()):
            for field in ("created_at", "updated_at"):
                assert datetime.fromisoformat(view[field]).utcoffset() is not None, (field, view[field])


def test_every_error_answer_is_documented_with_the_body_it_has(make_client):
    runner = FakeRunner(fail=False)
    with make_client(runner, max_body_bytes=2000) as c:
        doc = c.get("/openapi.json").json()
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        c.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH)
        answers = [
            ("post", "/v1/jobs", c.post("/v1/jobs", json={**SPEC, "optim": {"lr": -1}}, headers=AUTH), 422),
            ("post", "/v1/jobs", c.post("/v1/jobs", content=b"[1]", headers={**AUTH, "Content-Type": "application/json"}), 422),
            ("post", "/v1/jobs", c.post("/v1/jobs", json={**SPEC, "pad": "y" * 5000}, headers=AUTH), 413),
            ("post", "/v1/jobs", c.post("/v1/jobs", json=SPEC), 401),
            ("get", "/v1/jobs", c.get("/v1/jobs", params={"status": "bogus"}, headers=AUTH), 422),
            ("get", "/v1/jobs/{job_id}", c.get("/v1/jobs/nope", headers=AUTH), 404),
            ("post", "/v1/jobs/{job_id}/cancel", c.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH), 409),
            ("get", "/v1/jobs/{job_id}/logs", c.get("/v1/jobs/nope/logs", headers=AUTH), 404),
            ("get", "/v1/models/{name}", c.get("/v1/models/nope", headers=AUTH), 404),
            ("get", "/metrics", c.get("/metrics"), 401),
        ]
        for method, path, r, code in answers:
            assert r.status_code == code, (method, path, r.status_code, r.text)
            _conforms(doc, method, path, r)
        for path, methods in doc["paths"].items():
            for method, op in methods.items():
                if path not in ("/healthz", "/readyz"):
                    assert "401" in op["responses"] and op["security"] == [{"HTTPBearer": []}], (method, path)
        assert doc["components"]["securitySchemes"]["HTTPBearer"] == {
            "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["HTTPBearer"]
            ["description"]}


OPERATIONS = {
    ("post", "/v1/jobs"): "submitJob", ("get", "/v1/jobs"): "listJobs", ("get", "/v1/jobs/{job_id}"): "getJob",
    ("get", "/v1/jobs/{job_id}/logs"): "getJobLogs", ("get", "/v1/jobs/{job_id}/metrics"): "getJobMetrics",
    ("post", "/v1/jobs/{job_id}/cancel"): "cancelJob", ("get", "/v1/models"): "listModels",
    ("get", "/v1/models/{name}"): "getModel", ("post", "/v1/models/{name}/aliases"): "setModelAlias",
    ("get", "/healthz"): "healthz", ("get", "/readyz"): "readyz", ("get", "/metrics"): "metrics",
}


def test_every_operation_has_an_id_and_a_documented_answer(make_client):
    with make_client() as c:
        doc = c.get("/openapi.json").json()
    ids = {(method, path): op.get("operationId") for path, ops in doc["paths"].items() for method, op in ops.items()}
    assert ids == OPERATIONS
    for (method, path), op in ((k, doc["paths"][k[1]][k[0]]) for k in OPERATIONS):
        ok = next(code for code in op["responses"] if code.startswith("2"))
        assert op["responses"][ok]["content"], (method, path)  # a schema for JSON, text/plain for logs and metrics


def test_the_job_spec_is_documented_field_by_field_with_its_limits(make_client):
    with make_client() as c:
        doc = c.get("/openapi.json").json()
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    kinds = {"pretrain": "PretrainSpec", "evaluate": "EvaluateSpec", "tune": "TuneSpec", "embed": "EmbedSpec"}
    assert body["discriminator"] == {"propertyName": "kind", "mapping": {
        kind: f"#/components/schemas/{model}" for kind, model in kinds.items()}}
    schemas = doc["components"]["schemas"]
    assert set(schemas["PretrainSpec"]["properties"]) >= {"kind", "name", "data", "optim", "scaling", "register"}
    assert schemas["OptimSpec"]["properties"]["lr"]["exclusiveMinimum"] == 0.0
    assert schemas["OptimSpec"]["properties"]["lr"]["maximum"] == 100.0
    assert schemas["EvaluateSpec"]["required"] == ["encoder"] and set(schemas["TuneSpec"]["required"]) == {"base", "space"}


def test_status_and_kind_filters_say_what_they_accept(make_client):
    with make_client() as c:
        params = {p["name"]: p["schema"] for p in c.get("/openapi.json").json()["paths"]["/v1/jobs"]["get"]["parameters"]}
        for name, values in (("status", STATUSES), ("kind", KINDS)):
            [choice] = [s for s in params[name]["anyOf"] if s.get("type") == "string"]
            assert set(choice["enum"]) == set(values), (name, choice)
        assert c.get("/v1/jobs", params={"kind": ""}, headers=AUTH).status_code == 422
        assert c.get("/v1/jobs", params={"status": "lost", "kind": "tune"}, headers=AUTH).json()["total"] == 0


def test_an_idempotency_key_reused_for_another_spec_is_422_naming_it(make_client):
    runner = FakeRunner()
    with make_client(runner) as c:
        h = {**AUTH, "Idempotency-Key": "key-42"}
        first = c.post("/v1/jobs", json=SPEC, headers=h)
        assert first.status_code == 201
        r = c.post("/v1/jobs", json={**SPEC, "name": "something-else"}, headers=h)
        assert r.status_code == 422 and "key-42" in r.json()["detail"] and first.json()["id"] in r.json()["detail"]
        # the same spec again, written differently (a default spelled out): the same job
        again = c.post("/v1/jobs", json={"method": "leoclr", **SPEC}, headers=h)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert len(runner.submitted) == 1 and c.get("/v1/jobs", headers=AUTH).json()["total"] == 1


class RacingRunner(FakeRunner):
    """Holds each stop until `parties` cancels are all past their status check, as concurrent requests are."""

    def __init__(self, parties: int):
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=30)

    def stop(self, submission_id):
        self.barrier.wait()
        return super().stop(submission_id)


def test_of_concurrent_cancels_of_one_job_exactly_one_succeeds(make_client):
    runner = RacingRunner(4)
    with make_client(runner) as c:
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: c.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH).status_code,
                                  range(4)))
        assert sorted(codes) == [200, 409, 409, 409], codes
        assert c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["status"] == "cancelled"


def test_thirty_simultaneous_posts_with_one_idempotency_key_make_one_job(make_client):
    # Through the app's worker threads at once, on both stores: every request but one finds the key
    # taken (before its insert, or by the unique index refusing it) and answers the job that one made.
    runner = FakeRunner()
    barrier = threading.Barrier(30, timeout=60)

    def post(_):
        barrier.wait()
        r = c.post("/v1/jobs", json=SPEC, headers={**AUTH, "Idempotency-Key": "burst-1"})
        return r.status_code, r.json().get("id")

    with make_client(runner) as c:
        with ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(post, range(30)))
        codes = sorted(code for code, _ in answers)
        assert codes == [200] * 29 + [201], answers
        assert len({job_id for _, job_id in answers}) == 1
        assert c.get("/v1/jobs", headers=AUTH).json()["total"] == 1 and len(runner.submitted) == 1


class FinishRace(FakeRunner):
    """Ray reports the job succeeded to the reconcile loop while it takes the API's stop: both sides
    reach the store's finish at the same moment (the barrier), each sure the job is theirs to end."""

    def __init__(self):
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=30)

    def stop(self, submission_id):
        self.barrier.wait()
        return True


def test_a_cancel_racing_the_loops_finish_has_one_outcome_and_the_job_is_finished_once(make_client):
    from service.reconcile import reconcile_once

    runner = FinishRace()
    with make_client(runner, reconcile_interval=3600) as c:
        store = c.app.state.store
        finish, wins = store.finish, []
        store.finish = lambda *a, **kw: (lambda job: wins.append(job) or job)(finish(*a, **kw))
        for _ in range(4):
            job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
            runner.state = "succeeded"
            result = {"knn_top1": 12.5}
            loop = ThreadPoolExecutor(1).submit(
                reconcile_once, store, runner, read_result=lambda j: runner.barrier.wait() is not None and result)
            cancel = c.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH)
            assert loop.result(timeout=60) in (0, 1)
            final = c.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()
            assert len([w for w in wins if w is not None and w.id == job["id"]]) == 1, wins  # finished once
            if final["status"] == "cancelled":
                assert cancel.status_code == 200 and final["result"] is None, (cancel.text, final)
            else:
                assert final["status"] == "succeeded" and final["result"] == result, final
                assert cancel.status_code == 409 and "succeeded" in cancel.json()["detail"], cancel.text
            runner.state = "running"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"kind": "nope"}', b"x" * 5000])
def test_a_request_without_the_token_is_401_whatever_its_body(make_client, body):
    with make_client(max_body_bytes=1000) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2VjcmV0LXRva2Vu"}):
            r = c.post("/v1/jobs", content=body, headers={**headers, "Content-Type": "application/json"})
            assert r.status_code == 401 and r.json() == {"detail": "missing or wrong bearer token"}, r.text
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "application/json"}).status_code in (
            413, 422)


@pytest.fixture()
def api_env():
    """The MLflow settings Tracking puts in the process's environment, put back as they were."""
    saved = {k: os.environ.get(k) for k in API_HTTP_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)  # MLflow's own defaults would retry for minutes: this read must not
def test_a_job_reads_while_mlflow_is_unreachable_and_says_why(make_client, api_env):
    uri = f"http://127.0.0.1:{_closed_port()}"
    with make_client(mlflow_tracking_uri=uri) as c:
        doc = c.get("/openapi.json").json()
        job = c.post("/v1/jobs", json=SPEC, headers=AUTH).json()
        r = c.get(f"/v1/jobs/{job['id']}", headers=AUTH)
        # kept queued (a driver started now could log nothing), saying why, and read without a 500
        assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["progress"] is None, r.json()
        assert "MLflow" in r.json()["error"] and "127.0.0.1" in r.json()["error"], r.json()
        assert "MLflow" in r.json()["tracking_error"] and "127.0.0.1" in r.json()["tracking_error"], r.json()
        _conforms(doc, "get", "/v1/jobs/{job_id}", r)
        for path, r in (("/v1/models", c.get("/v1/models", headers=AUTH)),
                        ("/v1/jobs/{job_id}/metrics", c.get(f"/v1/jobs/{job['id']}/metrics", headers=AUTH))):
            assert r.status_code == 503 and "MLflow" in r.json()["detail"], (path, r.text)
            _conforms(doc, "get", path, r)
