"""A small, bounded load run of the REST API: status reads per second and their latency.

    python -m bench.api_load                      # starts the service on embedded defaults itself
    python -m bench.api_load --url URL --job ID   # against a running service and one of its jobs

With no --url it starts `leoclr serve` (a fresh embedded Ray head) on LEOCLR_DATA_DIR, submits a
small pretraining job, and measures `GET /v1/jobs/{id}` while that job trains (each read asks Ray
for the job's status and MLflow for its progress, on the same cores the job trains on), then
cancels it and measures reads of the finished job and of the job list on an idle machine.

Besides requests/s and latency, each phase says what one request cost in CPU time: in the service
(its `process_cpu_seconds_total`, from /metrics) and in this client. On a machine where both share
the cores, those two, not the wall clock, say which side sets the ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx

from leoclr_core.cli.client import ApiClient

LOAD_SPEC = {
    "kind": "pretrain", "name": "loadtest",
    "data": {"num_images": 2048, "num_test_images": 64, "image_size": 16,
             "synthetic": {"source_size": 32, "object_size": [13, 19]}},
    "model": {"backbone": "tiny", "width": 8, "proj_hidden_dim": 32, "proj_dim": 16},
    "loss": {"queue_size": 256}, "optim": {"epochs": 1000, "batch_size": 64},
    # views made on the training worker: 2 CPUs, which fits the embedded head of a 2-core machine
    "augment": {"batched": True, "device": "gpu"},
    "eval": {"knn_every": 0}, "checkpoint": {"every": 1000},
}


async def _hammer(url: str, token: str, path: str, requests: int, concurrency: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    todo = iter(range(requests))

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for _ in todo:
            if time.perf_counter() > deadline:
                return
            t = time.perf_counter()
            r = await http.get(path)
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=30) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return {"path": path, "requests": n, "errors": errors, "concurrency": concurrency,
            "per_s": round(n / wall, 1), "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[min(n - 1, int(0.99 * n))], 1)}


def _server_cpu_s(client: ApiClient) -> float | None:
    """The service's CPU seconds so far, from its Prometheus metrics (None if it does not say)."""
    for line in client.http.get("/metrics").text.splitlines():
        if line.startswith("process_cpu_seconds_total "):
            return float(line.split()[1])
    return None


def run(client: ApiClient, job_id: str | None, requests: int, concurrency: int, seconds: float) -> list[dict]:
    token = client.http.headers["Authorization"].removeprefix("Bearer ")
    rows = []

    def measure(label: str, path: str) -> None:
        server, mine = _server_cpu_s(client), time.process_time()
        row = {"phase": label, **asyncio.run(_hammer(client.url, token, path, requests, concurrency, seconds))}
        mine, after = time.process_time() - mine, _server_cpu_s(client)
        if server is not None and after is not None:
            row["server_cpu_ms_per_req"] = round(1000 * (after - server) / row["requests"], 3)
        row["client_cpu_ms_per_req"] = round(1000 * mine / row["requests"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)

    if job_id is not None:
        measure("given job", f"/v1/jobs/{job_id}")
        return rows
    job = client.submit(LOAD_SPEC)
    deadline = time.monotonic() + 300
    while not (client.job(job["id"]).get("progress") or {}).get("step"):
        if time.monotonic() > deadline:
            raise TimeoutError("the load job did not start training within 300 s")
        time.sleep(1)
    measure("running job (training on the same cores)", f"/v1/jobs/{job['id']}")
    client.cancel(job["id"])
    client.wait(job["id"], interval=1)
    time.sleep(5)  # let the stopped job's processes exit
    measure("finished job (idle machine)", f"/v1/jobs/{job['id']}")
    measure("job list (idle machine)", "/v1/jobs?limit=50")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="A running service (default: start one on embedded defaults).")
    p.add_argument("--job", help="With --url: the job whose status to read.")
    p.add_argument("--requests", type=int, default=1000, help="Requests per phase (bounded).")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0, help="Time limit per phase.")
    a = p.parse_args()
    if a.url:
        run(ApiClient(url=a.url), a.job, a.requests, a.concurrency, a.seconds)
        return
    from leoclr_core.cli.embedded import embedded_service

    with embedded_service() as client:
        run(client, None, a.requests, a.concurrency, a.seconds)


if __name__ == "__main__":
    main()
