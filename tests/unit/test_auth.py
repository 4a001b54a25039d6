"""Bearer-token auth (service/auth.py): who may call what, and the token the service makes itself."""

from __future__ import annotations

from .fakes import SPEC, make_client  # noqa: F401 - make_client is a fixture


def test_every_job_route_needs_the_token_but_health_does_not(make_client):
    with make_client() as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.post("/v1/jobs", json=SPEC).status_code == 401
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/jobs/abc").status_code == 401


def test_a_generated_token_is_private(tmp_path):
    from service.auth import ensure_token

    token = ensure_token(None, tmp_path / "api-token")
    assert len(token) >= 32 and (tmp_path / "api-token").stat().st_mode & 0o777 == 0o600
    assert ensure_token(None, tmp_path / "api-token") == token
