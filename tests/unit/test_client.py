"""The `leoclr` client verbs (leoclr_core/cli/client.py) against the real app, in-process."""

from __future__ import annotations

import pytest

from leoclr_core.cli.client import ClientSettings

from .fakes import AUTH, SPEC, FakeRunner, make_client  # noqa: F401 - make_client is a fixture


@pytest.fixture()
def cli(make_client, monkeypatch):
    """`leoclr` client commands against the app, through the real ApiClient and a FakeRunner."""
    from typer.testing import CliRunner

    import leoclr_core.cli.client as client
    from leoclr_core.cli import app

    runner = FakeRunner()
    with make_client(runner) as c:
        c.headers.update(AUTH)
        real = client.ApiClient
        monkeypatch.setattr(client, "ApiClient", lambda *a, **k: real(http=c))
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
    from leoclr_core.cli.client import ApiClient, ApiError

    monkeypatch.delenv("LEOCLR_API_TOKEN", raising=False)
    with pytest.raises(ApiError, match="no API token"):
        ApiClient(settings=ClientSettings(data_dir=tmp_path / "empty"))
    client = ApiClient(url="http://127.0.0.1:9", token="t", settings=ClientSettings(data_dir=tmp_path))
    with pytest.raises(ApiError, match="cannot reach the API at http://127.0.0.1:9"):
        client.jobs()
