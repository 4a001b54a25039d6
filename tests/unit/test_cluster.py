"""The embedded Ray head (service/cluster.py): where it keeps its session (its logs, every job driver's
log included), the token it authenticates with, and the environment it starts in."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from leoclr_core import contract
from service.cluster import MAX_TEMP_DIR, _ray_env, ensure_auth_token, session_dir


def _private(path):
    return stat.S_IMODE(path.stat().st_mode) == 0o700


def test_a_short_data_directory_holds_the_session_privately():
    data = Path(tempfile.mkdtemp(prefix="l", dir="/tmp"))  # pytest's own folders may be too long
    try:
        got = session_dir(data)
        assert got == data.resolve() / "ray-session" and _private(got)
    finally:
        shutil.rmtree(data)


def test_a_long_data_directory_gets_a_short_private_folder_found_again(tmp_path):
    data = tmp_path / ("x" * 60)
    data.mkdir()
    got = session_dir(data)
    assert len(str(got)) <= MAX_TEMP_DIR and _private(got) and not str(got).startswith("/tmp/ray")
    assert session_dir(data) == got  # the same folder for the next head of this data directory
    assert (data / "ray-session").resolve() == got


def test_the_embedded_head_gets_an_auth_token_on_a_machine_where_ray_never_ran(tmp_path, monkeypatch):
    # `ray start` with token auth refuses to start without one (ray.init would make its own), so
    # `make run` on a fresh machine failed before any test had run Ray there.
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


def test_the_embedded_head_starts_in_rays_one_environment_without_the_apis_mlflow_timeouts(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    env = _ray_env()
    assert {k: env[k] for k in contract.RAY_ENV} == contract.RAY_ENV
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in env


def test_stopping_a_head_this_process_started_returns_once_it_exits_not_at_the_timeout():
    """A stopped child stays a zombie until reaped, and signal 0 still reaches a zombie: a stop that
    only asked the pid waited its whole timeout every time (30 s of every `leoclr serve` stop)."""
    import subprocess
    import time

    from service.cluster import EmbeddedHead

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    head = EmbeddedHead(proc.pid, "127.0.0.1:1", "http://127.0.0.1:1")
    began = time.monotonic()
    head.stop(timeout=20)
    assert time.monotonic() - began < 10
    assert _reaped(proc.pid)  # gone, not left a zombie


def _reaped(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return True
    return False
