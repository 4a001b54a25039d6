"""The CPU image runs every role it claims, as its non-root user: the CLI without the source tree,
the REST API, a Ray head with a second container joining it as a worker (token auth), the MLflow
server. And docker/Dockerfile.cuda, which cannot be built here (no CUDA base image), parses and
builds its image with the very steps of docker/Dockerfile."""

from __future__ import annotations

import secrets
import textwrap
from pathlib import Path

import dockerfile
import httpx
import pytest

from tests.deploy.docker import Daemon, free_ports, wait_http

REPO = Path(__file__).resolve().parents[2]
UID = "1000"


def _uids(daemon: Daemon, container: str) -> set[str]:
    """The uid of every process in the container, as the host sees them."""
    lines = daemon.docker("top", container, "-eo", "pid,uid,args").stdout.splitlines()[1:]
    return {line.split()[1] for line in lines if line.strip()}


def _node_ports() -> list[str]:
    """Every port a Ray node binds, chosen free: the nodes share the host's network."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    return [f"{name}={port}" for name, port in zip(names, free_ports(len(names)))]


@pytest.mark.deploy
@pytest.mark.timeout(1800)
def test_the_cli_runs_from_the_installed_package_as_a_non_root_user(docker_daemon, leoclr_image):
    assert docker_daemon.docker("image", "inspect", "--format", "{{.Config.User}}", leoclr_image.tag).stdout.strip() \
        == f"{UID}:{UID}"
    script = textwrap.dedent("""\
        id -u
        test ! -e /src && test ! -e /app/leoclr_core && echo no-source-tree
        python -c 'import leoclr_core, service; print(leoclr_core.__file__); print(service.__file__)'
        leoclr --help
    """)
    out = docker_daemon.docker("run", "--rm", "--network", "none", leoclr_image.tag, "bash", "-euc", script).stdout
    uid, no_source, core, service, *help_text = out.splitlines()
    assert (uid, no_source) == (UID, "no-source-tree")
    assert core.startswith("/opt/venv/lib/") and service.startswith("/opt/venv/lib/"), (core, service)
    for command in ("pretrain", "serve", "submit", "run-job"):
        assert command in "\n".join(help_text), f"`leoclr --help` lists no {command}"


NODE_IP = "127.0.0.2"


@pytest.fixture(scope="module")
def ray_cluster(docker_daemon, leoclr_image):
    """A Ray head container and a worker container joining it on the loopback network, with token
    auth as deploy/ runs them. Their address is NODE_IP: `ray start` on Linux takes 127.0.0.1 for
    the machine's outward address when other nodes join."""
    gcs, dashboard, client = free_ports(3)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # No drain on SIGTERM (for Ray Serve replicas): the containers go with the test.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    # /dev/shm of a container is 64 MB unless sized: Ray's object store lives there.
    opts = ["--shm-size", "512m"]
    common = ["--block", f"--node-ip-address={NODE_IP}", "--disable-usage-stats", "--num-cpus=1",
              "--object-store-memory=200000000"]
    head = docker_daemon.run(leoclr_image.tag, "ray", "start", "--head", *common, f"--port={gcs}",
                             f"--ray-client-server-port={client}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *_node_ports(),
                             env=env, options=opts)
    wait_http(f"http://127.0.0.1:{dashboard}/api/version", 180, daemon=docker_daemon, container=head,
              headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    worker = docker_daemon.run(leoclr_image.tag, "ray", "start", f"--address={NODE_IP}:{gcs}", *common,
                               *_node_ports(), env=env, options=opts)
    yield {"head": head, "worker": worker, "gcs": gcs, "dashboard": dashboard, "env": env}
    docker_daemon.remove(worker, head)


@pytest.mark.deploy
@pytest.mark.timeout(1800)
def test_a_worker_container_joins_the_head_container_and_runs_tasks(docker_daemon, ray_cluster):
    # From inside the head container: the driver gets the token from the container's environment.
    probe = textwrap.dedent(f"""\
        import os, sys, time
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ray.init(address="{NODE_IP}:{ray_cluster['gcs']}", logging_level="ERROR")
        for _ in range(240):
            nodes = [n for n in ray.nodes() if n["Alive"]]
            if len(nodes) == 2:
                break
            time.sleep(0.5)
        else:
            sys.exit(f"{{len(nodes)}} node(s) alive, not 2")

        @ray.remote(num_cpus=1)
        def where():
            return ray.get_runtime_context().get_node_id(), os.getuid()

        for node in nodes:
            ran_on, uid = ray.get(where.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(), timeout=120)
            assert ran_on == node["NodeID"], (ran_on, node["NodeID"])
            print("task ran on", node["NodeManagerAddress"], "head" if node["Resources"].get("node:__internal_head__")
                  else "worker", "as uid", uid)
    """)
    out = docker_daemon.exec(ray_cluster["head"], "python", "-c", probe, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("task ran on")]
    assert sorted(line.split()[4] for line in lines) == ["head", "worker"], out.stdout + out.stderr
    assert all(line.split()[3] == NODE_IP for line in lines), lines
    assert all(line.endswith(f"as uid {UID}") for line in lines), lines
    for container in (ray_cluster["head"], ray_cluster["worker"]):
        assert _uids(docker_daemon, container) == {UID}, docker_daemon.docker("top", container).stdout


@pytest.mark.deploy
@pytest.mark.timeout(1800)
def test_the_api_answers_and_reaches_the_ray_container(docker_daemon, leoclr_image, ray_cluster):
    [port] = free_ports()
    api = docker_daemon.run(leoclr_image.tag, "leoclr", "serve", "--host", "127.0.0.1", "--port", str(port),
                            env={**ray_cluster["env"],
                                 "LEOCLR_RAY_JOBS_ADDRESS": f"http://127.0.0.1:{ray_cluster['dashboard']}"})
    try:
        assert wait_http(f"http://127.0.0.1:{port}/healthz", 120, daemon=docker_daemon, container=api).json() \
            == {"status": "ok"}
        # Ready: its job store (SQLite under /data, written as uid 1000) and the head's Jobs API (token) answer.
        wait_http(f"http://127.0.0.1:{port}/readyz", 120, daemon=docker_daemon, container=api)
        assert _uids(docker_daemon, api) == {UID}
    finally:
        docker_daemon.remove(api)


@pytest.mark.deploy
@pytest.mark.timeout(1800)
def test_the_mlflow_server_answers_and_stores_as_a_non_root_user(docker_daemon, leoclr_image):
    [port] = free_ports()
    server = docker_daemon.run(leoclr_image.tag, "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", "sqlite:////data/mlflow.db",
                               "--artifacts-destination", "/mlartifacts", "--workers", "1")
    try:
        assert wait_http(f"http://127.0.0.1:{port}/health", 180, daemon=docker_daemon, container=server).text == "OK"
        created = httpx.post(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/create", json={"name": "image-test"},
                             timeout=30)
        assert created.status_code == 200, created.text
        assert _uids(docker_daemon, server) == {UID}
    finally:
        docker_daemon.remove(server)


# Reading only: the CUDA image cannot be built here.

def _instructions(path: Path) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(path)))


def test_the_cuda_dockerfile_builds_with_the_cpu_images_steps():
    cpu, cuda = _instructions(REPO / "docker" / "Dockerfile"), _instructions(REPO / "docker" / "Dockerfile.cuda")

    def steps(commands: list[dockerfile.Command]) -> list[str]:
        # ARG defaults, the default command and the health check are the only parts allowed to differ.
        return [f"ARG {c.value[0].split('=')[0]}" if c.cmd == "ARG" else c.original
                for c in commands if c.cmd not in ("CMD", "HEALTHCHECK")]

    assert steps(cuda) == steps(cpu)
    defaults = lambda commands: dict(c.value[0].split("=", 1) for c in commands if c.cmd == "ARG" and "=" in c.value[0])
    differ = {name for name, value in defaults(cpu).items() if defaults(cuda)[name] != value}
    assert differ == {"BASE_IMAGE", "PYTHON_SOURCE", "TORCH_INDEX_URL", "IMAGE_TITLE", "IMAGE_DESCRIPTION"}
    # The same Python patch, torch and torchvision in both: a GPU worker's checkpoint is read on a CPU head.
    assert "3.11.13" in defaults(cpu)["PYTHON_IMAGE"] and defaults(cpu)["PYTHON_VERSION"] == "3.11.13"
    assert defaults(cpu)["BASE_IMAGE"] == defaults(cpu)["PYTHON_IMAGE"]
