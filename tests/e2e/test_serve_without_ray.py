"""`leoclr serve` pointed at a Ray Jobs API that does not answer: it starts anyway (it used to exit
with a traceback), says it is not ready and why, and keeps the jobs it accepts queued."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx

from .conftest import clean_env, free_ports, tiny_pretrain, wait_healthy


def test_serve_starts_without_its_ray_cluster_and_holds_jobs_queued(tmp_path):
    port, closed = free_ports(2)  # nothing listens on `closed`
    env = clean_env(LEOCLR_DATA_DIR=str(tmp_path), LEOCLR_API_TOKEN="t0ken",
                    LEOCLR_RAY_JOBS_ADDRESS=f"http://127.0.0.1:{closed}")
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
        assert "Traceback" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
