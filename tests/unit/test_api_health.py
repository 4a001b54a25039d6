"""Probes and the Prometheus metrics (routers/health.py, middleware.py)."""

from __future__ import annotations

from .fakes import AUTH, SPEC, make_client  # noqa: F401 - make_client is a fixture


def test_health_answers_ok_and_ready_with_a_cluster_that_answers(make_client):
    with make_client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready"}


def test_prometheus_metrics_count_requests_and_jobs(make_client):
    with make_client() as c:
        c.post("/v1/jobs", json=SPEC, headers=AUTH)
        c.get("/v1/jobs/nope", headers=AUTH)
        assert c.get("/metrics").status_code == 401
        text = c.get("/metrics", headers=AUTH).text
        assert 'leoclr_jobs{kind="pretrain",status="queued"} 1.0' in text
        assert 'leoclr_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
        assert "process_cpu_seconds_total " in text  # what bench.api_load reads a request's cost from
