"""The compose stack for real: deploy/compose.yaml with the loopback overlay (deploy/compose.local.yaml)
brings up PostgreSQL, MLflow, a Ray head, a Ray worker and the API in containers on host networking;
the host's CLI runs the demo through it on the worker container and pulls the registered encoder by
alias; a worker container that dies mid-job comes back and the job finishes from its checkpoint;
`down` and `up` keep the jobs and the registry; a second worker added with --scale takes work.

The stack starts once for the module, as its own compose project on ports chosen free, and is
removed with its volumes at the end. Its start-up and the jobs' times are printed as figures."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy import docker

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[2]
POSTGRES_IMAGE = "leoclr-postgres:15"
# deploy/compose.local.yaml's ports, all chosen free: nothing of a developer's own is in the way.
PORTS = ("LOCAL_POSTGRES_PORT", "LOCAL_MLFLOW_PORT", "LOCAL_API_PORT", "LOCAL_RAY_PORT",
         "LOCAL_RAY_DASHBOARD_PORT", "LOCAL_RAY_CLIENT_PORT")
# The shortened demo: configs/demo.yaml on fewer images for fewer epochs (about a minute here).
DEMO_SET = ("data.num_images=1024", "data.num_test_images=200", "optim.epochs=3", "eval.knn_every=0")
# Variables of the developer's shell that would point a host process elsewhere than the stack.
OUTSIDE = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "LEOCLR_RAY_JOBS_ADDRESS",
           "LEOCLR_API_URL", "LEOCLR_API_TOKEN", "LEOCLR_STORAGE_PATH", "LEOCLR_DATA_DIR")


@dataclass
class Stack:
    daemon: docker.Daemon
    project: str
    env_file: Path
    values: dict[str, str]   # secrets and ports, as the env file has them
    workdir: Path

    def compose(self, *args: str, check: bool = True, timeout: float = 600,
                project: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.daemon.compose("-f", str(REPO / "deploy" / "compose.yaml"),
                                   "-f", str(REPO / "deploy" / "compose.local.yaml"),
                                   "--env-file", str(self.env_file), "-p", project or self.project, *args,
                                   check=check, timeout=timeout)

    def up(self, *args: str) -> float:
        """`up -d --wait` (every service healthy, in dependency order); the seconds it took."""
        started = time.monotonic()
        done = self.compose("up", "--detach", "--wait", "--pull", "never", *args, check=False)
        if done.returncode != 0:
            print(self.diagnosis())
            raise AssertionError(f"docker compose up failed:\n{done.stderr[-3000:]}")
        return time.monotonic() - started

    def diagnosis(self) -> str:
        ps = self.compose("ps", "--all", check=False).stdout
        logs = self.compose("logs", "--no-color", "--tail", "40", check=False)
        return f"{ps}\n{(logs.stdout + logs.stderr)[-8000:]}"

    def containers(self, service: str) -> list[str]:
        return sorted(self.compose("ps", "--quiet", service).stdout.split())

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.values['LOCAL_API_PORT']}"

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.values['LOCAL_MLFLOW_PORT']}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.values['LEOCLR_API_TOKEN']}"}

    def host_env(self, **extra: str) -> dict[str, str]:
        return {**{k: v for k, v in os.environ.items() if k not in OUTSIDE}, **extra}

    def node_id(self, container: str) -> str:
        """The Ray node a worker container runs. Ray names a file of the node's session folder after
        it; a restarted container keeps its earlier node's files there, so the newest one."""
        script = ("import glob, os\n"
                  "files = glob.glob('/tmp/ray/session_latest/dashboard_agent_listen_port_*')\n"
                  "print(max(files, key=os.path.getmtime).rsplit('_', 1)[1])\n")
        return self.daemon.exec(container, "python", "-c", script).stdout.strip()

    def ray_nodes(self) -> list[dict[str, Any]]:
        """Ray's node list, from its state API on the head (token-protected)."""
        r = httpx.get(f"http://127.0.0.1:{self.values['LOCAL_RAY_DASHBOARD_PORT']}/api/v0/nodes",
                      headers={"Authorization": f"Bearer {self.values['RAY_AUTH_TOKEN']}"}, timeout=30)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def alive_workers(self) -> set[str]:
        return {n["node_id"] for n in self.ray_nodes() if n["state"] == "ALIVE" and not n["is_head_node"]}

    def wait_workers(self, nodes: set[str], timeout: float = 60) -> None:
        """Until Ray lists exactly `nodes` as its live workers (a healthy container's raylet runs;
        the head may list it a moment later)."""
        deadline = time.monotonic() + timeout
        while self.alive_workers() != nodes:
            assert time.monotonic() < deadline, (self.ray_nodes(), nodes)
            time.sleep(0.5)

    def job(self, job_id: str) -> dict[str, Any]:
        r = httpx.get(f"{self.api}/v1/jobs/{job_id}", headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def submit(self, spec: dict[str, Any]) -> str:
        r = httpx.post(f"{self.api}/v1/jobs", json=spec, headers=self.headers, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def explain(self, job: dict[str, Any]) -> str:
        """Why a job did not succeed: its error and its driver's log (progress bars left out), short
        enough for pytest to show; the stack's containers and logs go to the captured output."""
        print(self.diagnosis())
        r = httpx.get(f"{self.api}/v1/jobs/{job['id']}/logs", params={"tail": 3000}, headers=self.headers,
                      timeout=60)
        lines = [line for line in r.text.replace("\r", "\n").splitlines()
                 if line.strip() and "\x1b[A" not in line and "row/s]" not in line]
        return f"job {job['name']} {job['status']}: {job.get('error')}\n" + "\n".join(lines[-40:])

    def wait_job(self, job_id: str, timeout: float = 420) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] not in ("queued", "running"):
                return job
            assert time.monotonic() < deadline, self.explain(job)
            time.sleep(1)


def _demo(name: str, **changes: Any) -> dict[str, Any]:
    """configs/demo.yaml as a JSON spec, shortened, with `changes` merged into its sections."""
    spec = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    spec["name"] = name
    spec["data"].update(num_images=1024, num_test_images=200)
    spec["optim"]["epochs"] = 3
    spec["eval"]["knn_every"] = 0
    for section, values in changes.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def _pull_and_embed(stack: Stack) -> None:
    """models:/leoclr-demo@candidate loaded and run on an image batch by a process on the host that
    knows only where MLflow is, as a user of the registry would."""
    pull = ("import json, mlflow, torch\n"
            "enc = mlflow.pytorch.load_model('models:/leoclr-demo@candidate', map_location='cpu').eval()\n"
            "with torch.no_grad():\n"
            "    out = enc(torch.rand(8, 3, 16, 16))\n"
            "print(json.dumps({'type': type(enc).__name__, 'shape': list(out.shape), "
            "'finite': bool(torch.isfinite(out).all())}))\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(stack.workdir),
           "MLFLOW_TRACKING_URI": stack.mlflow}
    pulled = subprocess.run([sys.executable, "-c", pull], cwd=stack.workdir, env=env, capture_output=True,
                            text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    embedded = json.loads(pulled.stdout.strip().splitlines()[-1])
    assert embedded == {"type": "ImageEncoder", "shape": [8, embedded["shape"][1]], "finite": True}


@pytest.fixture(scope="module")
def stack(docker_daemon: docker.Daemon, leoclr_image: docker.BuiltImage,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack")
    values = {
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "LEOCLR_API_TOKEN": secrets.token_hex(16),
        **dict(zip(PORTS, map(str, docker.free_ports(len(PORTS))))),
        "LOCAL_POSTGRES_IMAGE": POSTGRES_IMAGE,
        "LOCAL_BASE_IMAGE": docker.STAND_IN_BASE,
    }
    env_file = workdir / "stack.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    env_file.chmod(0o600)
    # A project of its own: its containers and volumes are named after it, apart from any stack of
    # the developer's on the same daemon.
    stack = Stack(docker_daemon, f"leoclr-test-{uuid.uuid4().hex[:8]}", env_file, values, workdir)
    started = time.monotonic()
    # Under one project name every time: compose labels an image with the project it was built in,
    # and a new label is a new image (the old one left dangling) even when every layer is cached.
    stack.compose("build", "postgres", project="leoclr-stand-in")
    docker.figure(f"stack: PostgreSQL stand-in image built in {time.monotonic() - started:.0f} s")
    try:
        seconds = stack.up()
        docker.figure(f"stack: up and healthy (PostgreSQL, MLflow, Ray head, 1 Ray worker, API) "
                      f"in {seconds:.0f} s")
        yield stack
    finally:
        started = time.monotonic()
        stack.compose("down", "--volumes", "--remove-orphans", check=False)
        docker.figure(f"stack: down -v in {time.monotonic() - started:.0f} s")


def test_the_demo_runs_on_the_worker_container_and_its_model_is_pulled_by_alias(stack: Stack):
    [worker] = stack.containers("ray-worker")
    worker_node = stack.node_id(worker)
    stack.wait_workers({worker_node})

    leoclr = str(Path(sys.executable).with_name("leoclr"))
    started = time.monotonic()
    done = subprocess.run([leoclr, "submit", "configs/demo.yaml", "--follow",
                           *(arg for s in DEMO_SET for arg in ("--set", s))],
                          cwd=REPO, env=stack.host_env(LEOCLR_API_URL=stack.api,
                                                       LEOCLR_API_TOKEN=stack.values["LEOCLR_API_TOKEN"]),
                          capture_output=True, text=True, timeout=420)
    docker.figure(f"stack: shortened demo (1024 images, 3 epochs) through the stack "
                  f"in {time.monotonic() - started:.0f} s")
    if done.returncode != 0:
        print(stack.diagnosis())
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "succeeded" and result["registry_uri"] == "models:/leoclr-demo@candidate"
    # The head offers no CPUs: the training worker ran on the worker container's node.
    assert result["worker_nodes"] == [worker_node]
    # Every node on the loopback address the overlay gives them, none on the machine's outward one.
    assert {n["node_ip"] for n in stack.ray_nodes() if n["state"] == "ALIVE"} == {"127.0.0.2"}

    started = time.monotonic()
    _pull_and_embed(stack)
    docker.figure(f"stack: models:/leoclr-demo@candidate pulled to the host and run "
                  f"in {time.monotonic() - started:.0f} s")


def test_a_worker_container_killed_mid_job_is_restarted_and_the_job_finishes(stack: Stack):
    [worker] = stack.containers("ray-worker")
    before = stack.node_id(worker)
    job_id = stack.submit(_demo("kill-demo", data={"num_images": 2048}, optim={"epochs": 8},
                                checkpoint={"every": 1, "keep": 2, "max_failures": 3},
                                register={"model_name": "kill-demo", "alias": "candidate"}))
    deadline = time.monotonic() + 300
    while True:  # a checkpoint in the shared volume, and epochs still to go
        job = stack.job(job_id)
        epoch = (job.get("progress") or {}).get("epoch") or 0
        if epoch >= 2:
            break
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, stack.explain(job)
        time.sleep(0.5)
    assert epoch < 8, "the job finished before the kill"

    # Every process of the container SIGKILLed from inside: to Docker the container died on its own,
    # as in a crash, and its restart policy brings it back. (`docker kill` would not do: Docker
    # counts a container stopped through its API as stopped on purpose and leaves it down, whatever
    # the restart policy.)
    killed = time.monotonic()
    stack.daemon.exec(worker, "python", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)")
    while True:
        state = stack.daemon.docker("inspect", "--format", "{{.RestartCount}} {{.State.Health.Status}}",
                                    worker).stdout.split()
        if int(state[0]) >= 1 and state[1] == "healthy":
            break
        assert time.monotonic() - killed < 180, f"the killed worker container: {state}\n{stack.diagnosis()}"
        time.sleep(0.5)
    back = time.monotonic() - killed
    after = stack.node_id(worker)
    assert after != before
    stack.wait_workers({after})

    job = stack.wait_job(job_id)
    finished = time.monotonic() - killed
    assert job["status"] == "succeeded", stack.explain(job)
    result = job["result"]
    # Ray Train restored the worker group from the newest checkpoint in the shared volume, on the
    # restarted container's new node, and ran the rest of the epochs there.
    assert result["restarts"] >= 1 and result["resumed_from"] and result["resumed_from"][0] >= 1, result
    assert result["epoch"] == 8 and result["worker_nodes"] == [after]
    docker.figure(f"stack: worker container killed after epoch {epoch} of 8: healthy again in {back:.0f} s, "
                  f"job succeeded {finished:.0f} s after the kill ({result['restarts']} restart(s), "
                  f"resumed after epoch {result['resumed_from'][0]})")


def test_down_and_up_keep_every_job_and_the_registry(stack: Stack):
    listed = httpx.get(f"{stack.api}/v1/jobs", headers=stack.headers, timeout=30).json()["items"]
    assert "demo" in {j["name"] for j in listed}
    before = {j["id"]: stack.job(j["id"]) for j in listed}
    started = time.monotonic()
    stack.compose("down")  # no --volumes: what a user's restart or upgrade does
    assert stack.containers("api") == []
    down = time.monotonic() - started
    up = stack.up()
    docker.figure(f"stack: down in {down:.0f} s, up and healthy again in {up:.0f} s (volumes kept)")

    again = httpx.get(f"{stack.api}/v1/jobs", headers=stack.headers, timeout=30).json()["items"]
    assert {j["id"] for j in again} == set(before)
    for job_id, job in before.items():
        kept = stack.job(job_id)
        assert (kept["status"], kept["result"], kept["spec"]) == (job["status"], job["result"], job["spec"])
    # The registry: the alias still resolves, to the same version, whose files are still served.
    models = httpx.get(f"{stack.api}/v1/models", headers=stack.headers, timeout=30).json()["items"]
    assert {m["name"]: m["aliases"] for m in models}["leoclr-demo"] == {"candidate": "1"}
    _pull_and_embed(stack)


def test_a_second_worker_added_with_scale_joins_and_takes_work(stack: Stack):
    started = time.monotonic()
    stack.up("--scale", "ray-worker=2")
    workers = stack.containers("ray-worker")
    assert len(workers) == 2
    nodes = {stack.node_id(c) for c in workers}
    stack.wait_workers(nodes)
    docker.figure(f"stack: second worker joined in {time.monotonic() - started:.0f} s")

    # One training worker on each node: the new container takes half the job.
    job_id = stack.submit(_demo("scale-demo", optim={"epochs": 2},
                                scaling={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
                                register={"model_name": "scale-demo", "alias": "candidate"}))
    job = stack.wait_job(job_id)
    assert job["status"] == "succeeded", stack.explain(job)
    assert sorted(job["result"]["worker_nodes"]) == sorted(nodes)
