"""`leoclr serve` pointed at a Ray Jobs API that does not answer: it starts anyway (it used to exit
with a traceback), says it is not ready and why, and keeps the jobs it accepts queued. Its job
store is on PostgreSQL here, reached with a password in its URL, beside an MLflow URI and an S3
storage path with credentials: it says at start where each is, masking every secret."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx

from tests.backends import S3_SECRET

from .conftest import clean_env, free_ports, tiny_pretrain, wait_healthy


def test_serve_starts_without_its_ray_cluster_and_holds_jobs_queued(tmp_path, postgres):
    port, closed = free_ports(2)  # nothing listens on `closed`
    # trust auth: the server takes any password, so the URL can carry one for the banner to mask
    database = postgres.database("serve").replace("postgresql+psycopg://postgres@", "postgresql://postgres:db-pass-9@")
    env = clean_env(LEOCLR_DATA_DIR=str(tmp_path), LEOCLR_API_TOKEN="t0ken",
                    LEOCLR_RAY_JOBS_ADDRESS=f"http://127.0.0.1:{closed}", LEOCLR_DATABASE_URL=database,
                    MLFLOW_TRACKING_URI=f"http://alice:ml-pass-7@127.0.0.1:{closed}",
                    LEOCLR_STORAGE_PATH="s3://checkpoints/leoclr", AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed}",
                    AWS_ACCESS_KEY_ID="leoclr-test-key", AWS_SECRET_ACCESS_KEY=S3_SECRET)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "leoclr_core.cli", "serve", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout=120)
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 503 and "Ray Jobs API" in ready.json()["detail"], ready.text
        r = httpx.post(f"{url}/v1/jobs", json=tiny_pretrain("waits-for-ray"), timeout=30,
                       headers={"Authorization": "Bearer t0ken"})
        assert r.status_code == 201 and r.json()["status"] == "queued", r.text
        assert proc.poll() is None
        text = log.read_text()
        assert "Traceback" not in text
        host = database.split("@", 1)[1]
        assert f"job store: postgresql+psycopg://postgres:***@{host}" in text, text[:2000]
        assert f"MLflow: http://alice:***@127.0.0.1:{closed}" in text, text[:2000]
        assert f"checkpoints: s3://checkpoints/leoclr at http://127.0.0.1:{closed} (AWS_ENDPOINT_URL)" in text
        assert not any(secret in text for secret in ("db-pass-9", "ml-pass-7", S3_SECRET)), text[:2000]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    # the service upgraded the store's schema on start, on PostgreSQL
    from service import migrations

    assert migrations.current(database) == migrations.HEAD
