"""A real two-node Ray cluster of separate processes on the loopback network (token auth), the API started
against it through RAY_ADDRESS, and a pretrain job submitted over REST whose two DDP workers are
spread across both nodes: it succeeds with its checkpoints in the shared storage path and its
encoder in the registry. What a cluster deployment (deploy/) does, at laptop scale."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import clean_env, free_ports, tiny_pretrain, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
# The nodes' address: loopback, but not 127.0.0.1, which `ray start` on Linux rewrites to the
# machine's outward address for a cluster that other nodes join (as it does "localhost").
NODE_IP = "127.0.0.2"
TOKEN = "cluster-token-0123456789"
H = {"Authorization": f"Bearer {TOKEN}"}


def _node_ports() -> list[str]:
    """Every port a node binds, chosen free: two nodes share one machine here."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    return [f"{name}={port}" for name, port in zip(names, free_ports(len(names)))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    shared = root / "shared-storage"  # what an NFS mount or a bucket is on a real cluster
    shared.mkdir()
    gcs, dash = free_ports(2)
    ray = str(Path(sys.executable).with_name("ray"))
    # The nodes run `leoclr run-job` for the API, from their PATH (an image's, an activated venv's).
    # Every process of the cluster gets the token in RAY_AUTH_TOKEN, as deploy/ does: `ray start`
    # makes none, and on a fresh machine there is no ~/.ray/auth_token to fall back on.
    # No drain on SIGTERM (30 s by default, for Ray Serve replicas): the cluster is stopped with the test.
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    procs = []

    def start(args: list[str], log: str) -> None:
        procs.append(subprocess.Popen([ray, "start", "--block", f"--node-ip-address={NODE_IP}", "--disable-usage-stats",
                                       *args, *_node_ports()], env=env, start_new_session=True,
                                      stdout=open(root / log, "wb"), stderr=subprocess.STDOUT))

    start(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", "--num-cpus=3"], "head.log")
    deadline = time.monotonic() + 120
    while True:  # the second node joins a head that answers
        try:
            httpx.get(f"http://127.0.0.1:{dash}/api/version", timeout=2)
            break
        except httpx.HTTPError:
            assert procs[0].poll() is None and time.monotonic() < deadline, (root / "head.log").read_text()[-3000:]
            time.sleep(0.5)
    start([f"--address={NODE_IP}:{gcs}", "--num-cpus=2"], "worker.log")
    # The API sizes jobs against the nodes Ray reports: both must have joined before a job is sent.
    waiter = ("import sys, time\nfrom ray.util.state import list_nodes\n"
              "for _ in range(240):\n"
              f"    nodes = list_nodes(address='http://127.0.0.1:{dash}', filters=[('state', '=', 'ALIVE')])\n"
              "    if len(nodes) == 2:\n"
              "        print(' '.join(n.node_ip for n in nodes))\n"
              "        sys.exit(0)\n"
              "    time.sleep(0.5)\n"
              "sys.exit(1)\n")
    joined = subprocess.run([sys.executable, "-c", waiter], env=env, capture_output=True, text=True, timeout=180)
    assert joined.returncode == 0, (joined.stderr[-2000:], (root / "worker.log").read_text()[-3000:])
    assert joined.stdout.split() == [NODE_IP, NODE_IP], f"a node is not on the loopback address: {joined.stdout}"

    data = root / "data"
    [port] = free_ports()
    api_env = {**env, "RAY_ADDRESS": f"{NODE_IP}:{gcs}", "LEOCLR_DATA_DIR": str(data),
               "LEOCLR_STORAGE_PATH": str(shared), "LEOCLR_API_TOKEN": TOKEN}
    procs.append(subprocess.Popen([sys.executable, "-m", "leoclr_core.cli", "serve", "--port", str(port)],
                                  env=api_env, cwd=REPO, start_new_session=True,
                                  stdout=open(root / "serve.log", "wb"), stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, procs[-1], root / "serve.log")
    yield url, shared, root
    for p in reversed(procs):  # the API, then the worker node, then the head, each with its children
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(p.pid, signal.SIGKILL)


def test_a_job_over_rest_spreads_its_workers_over_both_nodes(cluster):
    url, shared, root = cluster
    spec = tiny_pretrain("cluster-demo", data={"num_images": 512, "num_test_images": 64, "image_size": 16,
                                               "synthetic": {"source_size": 32, "object_size": [13, 19]}},
                         loss={"queue_size": 128}, optim={"epochs": 2, "batch_size": 64},
                         scaling={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
                         register={"model_name": "cluster-encoder", "alias": "candidate"})
    r = httpx.post(f"{url}/v1/jobs", json=spec, headers=H, timeout=30)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 600
    while True:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=H, timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, (job, (root / "serve.log").read_text()[-2000:])
        time.sleep(2)
    assert job["status"] == "succeeded", job.get("error")
    result = job["result"]
    assert len(result["worker_nodes"]) == 2 and len(set(result["worker_nodes"])) == 2  # one worker per node
    assert result["storage"] == f"{shared}/cluster-demo"
    assert sorted(p.name for p in (shared / "cluster-demo").glob("epoch-*")) == ["epoch-0001", "epoch-0002"]
    [model] = httpx.get(f"{url}/v1/models", headers=H, timeout=30).json()["items"]
    assert model["name"] == "cluster-encoder" and model["aliases"] == {"candidate": "1"}
    assert model["versions"][0]["job_id"] == job_id
    assert job["progress"]["step"] == job["progress"]["total_steps"]
