"""The real service: `leoclr serve` with its embedded Ray head, a job submitted over REST, run as a
Ray Job, followed to its end; its model pulled from the registry in a fresh process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
TOKEN = "e2e-token-0123456789"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    data = tmp_path_factory.mktemp("service-data")
    port = _port()
    env = {**os.environ, "LEOCLR_DATA_DIR": str(data), "LEOCLR_API_TOKEN": TOKEN}
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LEOCLR_RAY_JOBS_ADDRESS"):
        env.pop(var, None)
    log = open(data / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "leoclr_core.cli", "serve", "--port", str(port), "--num-cpus", "4"],
                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (data / "serve.log").read_text()[-3000:]
        time.sleep(0.5)
    yield url, data, env
    proc.send_signal(signal.SIGINT)  # a clean stop also stops the embedded head
    proc.wait(timeout=60)


def test_a_job_goes_from_queued_to_succeeded_and_its_model_loads(service, tmp_path):
    url, data, env = service
    h = {"Authorization": f"Bearer {TOKEN}"}
    spec = {
        "kind": "pretrain", "name": "e2e-demo",
        "data": {"num_images": 256, "num_test_images": 64, "image_size": 16,
                 "synthetic": {"source_size": 32, "object_size": [13, 19]}},
        "model": {"backbone": "tiny", "width": 8, "proj_hidden_dim": 32, "proj_dim": 16},
        "loss": {"queue_size": 64}, "augment": {"batched": True}, "optim": {"epochs": 2, "batch_size": 32},
        "eval": {"knn_every": 0, "knn_k": 10}, "register": {"model_name": "e2e-encoder", "alias": "candidate"},
    }
    assert httpx.post(f"{url}/v1/jobs", json=spec).status_code == 401
    r = httpx.post(f"{url}/v1/jobs", json=spec, headers=h, timeout=30)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued"
    seen = {job["status"]}
    deadline = time.monotonic() + 400
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(2)
        job = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=h, timeout=30).json()
        seen.add(job["status"])
    assert job["status"] == "succeeded", job.get("error")
    assert "running" in seen
    assert job["result"]["registry_uri"] == "models:/e2e-encoder@candidate"
    code = ("import mlflow, torch\n"
            "m = mlflow.pytorch.load_model('models:/e2e-encoder@candidate')\n"
            "print(tuple(m(torch.rand(2, 3, 16, 16)).shape))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/",
                         env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{data}/mlflow.db"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(2, 64)"
