"""What the end-to-end tests share: free ports, a clean environment, waiting for an API, a tiny spec."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

# Variables of the developer's shell (or of an earlier test: mlflow.set_tracking_uri and
# set_registry_uri export theirs) that would point a test's processes at something else, and
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, which leoclr_core.distributed sets to 0 in a process talking to
# a loopback cluster and which, inherited by `ray start --address`, makes Ray refuse to add a node.
OUTSIDE = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "LEOCLR_RAY_JOBS_ADDRESS", "LEOCLR_API_URL",
           "LEOCLR_STORAGE_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def free_ports(n: int = 1) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OUTSIDE}
    return {**env, **extra}


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until `url`/healthz answers 200; fails with the end of `log` if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def tiny_pretrain(name: str, epochs: int = 2, **sections: Any) -> dict[str, Any]:
    """A pretrain spec whose epochs take about a second on 2 CPU cores."""
    spec: dict[str, Any] = {
        "kind": "pretrain", "name": name,
        "data": {"num_images": 256, "num_test_images": 64, "image_size": 16,
                 "synthetic": {"source_size": 32, "object_size": [13, 19]}},
        "model": {"backbone": "tiny", "width": 8, "proj_hidden_dim": 32, "proj_dim": 16},
        "loss": {"queue_size": 64}, "augment": {"batched": True}, "optim": {"epochs": epochs, "batch_size": 32},
        "eval": {"knn_every": 0, "knn_k": 10},
    }
    return {**spec, **sections}
