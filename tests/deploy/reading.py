"""What both static deploy modules read: the images docker/ builds and the versions it pins, and which
commands, options and variables exist, asked of the programs themselves (their Click objects) and of
the service (what it hands a job's driver). No Docker and no cluster needed."""

from __future__ import annotations

import re
import warnings
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
# Variables whose values are secrets: tokens, passwords, and connection URLs that carry a password.
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|DATABASE_URL|BACKEND_STORE_URI")
# Ray's token authentication, read by Ray itself (docs/configuration.md).
# Read by Ray itself (token auth; how long a stopping node drains): not settings of this project.
RAY_VARIABLES = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"}


def venv_tool(name: str, path: Path, package: str) -> Path:
    """A program the dev extra installs; its absence is a broken install, not a reason to skip."""
    assert path.is_file(), f"{name} is not at {path}: pip install -e '.[dev]' (the dev extra has {package})"
    return path


# ----------------------------------------------------------------------------- images
def constraint_pins() -> dict[str, str]:
    """docker/constraints.txt, the exact versions the images install: normalised name -> version."""
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line} is not an exact pin"
            pins[normalised(name)] = pinned.strip()
    return pins


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip().lower())


def built_images() -> dict[str, str]:
    """name:tag -> Dockerfile kind, from the OCI labels each Dockerfile stamps on its image (with the
    defaults of the build arguments they name: what a plain `docker build` of the file produces)."""
    out = {}
    for kind, path in DOCKERFILES.items():
        text = path.read_text()
        args = {k: v.strip('"') for k, v in re.findall(r'^ARG\s+(\w+)=("[^"]*"|\S+)', text, re.MULTILINE)}
        label = {}
        for key in ("title", "version"):
            found = re.search(rf'org\.opencontainers\.image\.{key}="([^"]+)"', text)
            assert found, f"{path.name}: no org.opencontainers.image.{key} LABEL"
            label[key] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], found.group(1))  # noqa: B023
        out[f"{label['title']}:{label['version']}"] = kind
    return out


def image_user(kind: str) -> int:
    """The numeric uid the image runs as (its last USER)."""
    users = re.findall(r"^USER\s+(\d+)(?::\d+)?\s*$", DOCKERFILES[kind].read_text(), re.MULTILINE)
    assert users, f"{DOCKERFILES[kind].name}: no numeric USER, so Kubernetes cannot verify runAsNonRoot"
    return int(users[-1])


# ----------------------------------------------------------------------------- commands and variables
@cache
def commands() -> dict[str, Any]:
    """The Click commands the deploy files run, from the programs themselves."""
    import typer

    from leoclr_core.cli import app

    with warnings.catch_warnings():  # Ray's CLI imports Ray Serve, which warns about its own pydantic use
        warnings.simplefilter("ignore")
        from mlflow.cli import server
        from ray.scripts.scripts import start

    leoclr = typer.main.get_command(app)
    return {**{f"leoclr {n}": c for n, c in leoclr.commands.items()},
            "ray start": start, "mlflow server": server}


def check_command(argv: list[str], where: str) -> None:
    """`leoclr CMD`, `ray start`, `mlflow server`: the command exists, and so does every --option."""
    program = Path(argv[0]).name
    if program not in ("leoclr", "ray", "mlflow"):
        return
    name = f"{program} {argv[1] if len(argv) > 1 else ''}"
    known = commands()
    assert name in known, f"{where}: `{name}` is not a command"
    options = {o for p in known[name].params for o in [*p.opts, *p.secondary_opts]}
    unknown = [o for o in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")) if o not in options]
    assert not unknown, f"{where}: `{name}` has no option {unknown}"


@cache
def driver_environment() -> dict[str, str]:
    """What the API hands every job's driver, as its Jobs client submits it (Ray is not contacted)."""
    from service.runner import RayJobsRunner
    from service.serve import DRIVER_MLFLOW_HTTP

    class Recorder:
        def submit_job(self, **kwargs: Any) -> str:
            self.kwargs = kwargs
            return "recorded"

    runner = RayJobsRunner("http://unused:8265", env=dict(DRIVER_MLFLOW_HTTP))
    runner._client = recorder = Recorder()  # in place of the JobSubmissionClient it would make
    runner.submit("job-id", {"kind": "pretrain"})
    return {"entrypoint": runner.entrypoint, **recorder.kwargs["runtime_env"]["env_vars"]}


@cache
def known_variables() -> frozenset[str]:
    from service.envdoc import variable_names
    from service.settings import ServiceSettings

    settings = {n for f in ServiceSettings.model_fields.values() for n in variable_names(f)}
    mlflow_server = {p.envvar for p in commands()["mlflow server"].params if isinstance(p.envvar, str)}
    return frozenset(settings | mlflow_server | RAY_VARIABLES | set(driver_environment()) - {"entrypoint"})


def check_variable(name: str, where: str) -> None:
    if name.startswith(("LEOCLR_", "MLFLOW_", "RAY_")):
        assert name in known_variables(), f"{where}: nothing reads {name} (no setting in service/settings.py)"


def holds_password(value: str) -> bool:
    return "://" in value and urlsplit(value).password is not None


def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in an argument list."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None
