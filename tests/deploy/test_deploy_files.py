"""Static checks of the deployment files (docker/, deploy/, .dockerignore), without Docker or a cluster.

They parse; the Kubernetes objects are valid for the Kubernetes API's schema (the official client's
models) and the KubeRay objects use only KubeRay v1 fields; and the files agree with each other and
with the code: every `leoclr` command and every flag given to `leoclr`, `ray start` and `mlflow
server` exists, every variable set is one something reads, every image is one the Dockerfiles
build, ports match end to end, secrets come only from the env file and Secrets.
"""

from __future__ import annotations

import ast
import json
import mmap
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cache
from importlib.metadata import version as dist_version
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes.client import ApiClient
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Images the project does not build, allowed in compose (pinned by tag, checked below).
THIRD_PARTY_IMAGES = {"postgres"}
# Variables Ray reads itself (checked against Ray's binary below); every other RAY_*, LEOCLR_* or
# MLFLOW_* variable a deployment file sets must be a setting of the project.
RAY_VARIABLES = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
# Variables whose values are secrets: tokens, passwords, and connection URLs that carry a password.
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|DATABASE_URL|BACKEND_STORE_URI")
# Checkpoint storage every node reaches without a shared volume.
OBJECT_STORES = ("s3://", "gs://")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


# ----------------------------------------------------------------------------- shared helpers
def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in an argument list."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _split(url: str):
    return urlsplit(url if "://" in url else f"tcp://{url}")


def url_port(url: str) -> int:
    port = _split(url).port
    assert port is not None, f"{url}: no port"
    return port


def url_host(url: str) -> str:
    return _split(url).hostname or ""


def healthcheck_url(argv: list[str]) -> str:
    """The URL of a `python -c "...urlopen('URL'...)"` health check (the images have no curl)."""
    text = " ".join(argv)
    assert "curl" not in text and "wget" not in text, f"{argv}: the images have neither curl nor wget"
    found = re.search(r"urlopen\('([^']+)'", text)
    assert found, f"{argv}: not a python urllib health check"
    return found.group(1)


def options_of(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


@cache
def settings_variables() -> frozenset[str]:
    from service.envdoc import variable_names
    from service.settings import ServiceSettings

    return frozenset(n for f in ServiceSettings.model_fields.values() for n in variable_names(f))


@cache
def contract_variables() -> frozenset[str]:
    """What the service hands a job's driver (`leoclr run-job`)."""
    from leoclr_core.contract import ENV_JOB_ID, ENV_JOB_SPEC

    return frozenset({ENV_JOB_SPEC, ENV_JOB_ID})


@cache
def leoclr_cli() -> Any:
    import typer

    from leoclr_core.cli import app

    return typer.main.get_command(app)


def _package_file(package: str, relative: str) -> Path:
    """A file of an installed package, found without importing it (Ray and MLflow take seconds)."""
    spec = find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / relative


def _click_options(decorators: list[ast.expr], shared: dict[str, dict]) -> dict[str, str | None]:
    """`--flag` -> envvar, from click.option decorators; `module.NAME` decorators looked up in `shared`."""
    options: dict[str, str | None] = {}
    for dec in decorators:
        if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "option":
            envvar = next((k.value.value for k in dec.keywords
                           if k.arg == "envvar" and isinstance(k.value, ast.Constant)), None)
            for arg in dec.args:  # "--flag", "-f", or a boolean pair "--flag/--no-flag"
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    for name in arg.value.split("/"):
                        if name.strip().startswith("--"):
                            options[name.strip()] = envvar
        elif isinstance(dec, ast.Attribute) and dec.attr in shared:
            options.update(shared[dec.attr])
    return options


def _function_decorators(path: Path, name: str) -> list[ast.expr]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node.decorator_list
    raise AssertionError(f"no function {name} in {path}")


@cache
def ray_start_options() -> frozenset[str]:
    """The options of `ray start`, read from Ray's source."""
    decorators = _function_decorators(_package_file("ray", "scripts/scripts.py"), "start")
    return frozenset(_click_options(decorators, {}))


@cache
def mlflow_server_options() -> dict[str, str | None]:
    """The options of `mlflow server` and the variable each can also be read from."""
    shared = {}
    for node in ast.parse(_package_file("mlflow", "utils/cli_args.py").read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            shared[node.targets[0].id] = _click_options([node.value], {})
    decorators = _function_decorators(_package_file("mlflow", "cli/__init__.py"), "server")
    return _click_options(decorators, shared)


@cache
def raylet_agent_port() -> int:
    """Ray's default dashboard-agent port, where /api/local_raylet_healthz answers."""
    text = _package_file("ray", "_private/ray_constants.py").read_text()
    return int(re.search(r"^DEFAULT_DASHBOARD_AGENT_LISTEN_PORT\s*=\s*(\d+)", text, re.M).group(1))


def check_command(argv: list[str], where: str) -> None:
    """`leoclr CMD`, `ray start`, `mlflow server`: the command exists, and so does every --option."""
    program = Path(argv[0]).name
    if program == "leoclr":
        assert len(argv) > 1, f"{where}: `leoclr` without a command"
        commands = leoclr_cli().commands
        assert argv[1] in commands, f"{where}: `leoclr {argv[1]}` is not a command ({sorted(commands)})"
        known = {o for p in commands[argv[1]].params for o in getattr(p, "opts", [])}
    elif program == "ray":
        assert argv[1] == "start", f"{where}: unexpected ray command {argv}"
        known = ray_start_options()
    elif program == "mlflow":
        assert argv[1] == "server", f"{where}: unexpected mlflow command {argv}"
        known = set(mlflow_server_options())
    else:
        return
    unknown = [o for o in options_of(argv[2:]) if o not in known]
    assert not unknown, f"{where}: `{program} {argv[1]}` has no option {unknown}"


def check_variable(name: str, where: str, argv: list[str] | None = None) -> None:
    if not name.startswith(("LEOCLR_", "MLFLOW_", "RAY_")):
        return
    allowed = settings_variables() | contract_variables() | RAY_VARIABLES
    if argv and argv[:2] == ["mlflow", "server"]:
        allowed |= {v for v in mlflow_server_options().values() if v}
    assert name in allowed, f"{where}: nothing reads {name} (it is not a setting in service/settings.py)"


def pinned_tag(image: str) -> str:
    """The tag (or digest) of an image reference; fails on none or `latest`."""
    if "@sha256:" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    assert ":" in last, f"{image}: no tag, so whatever is newest gets pulled"
    tag = last.split(":", 1)[1]
    assert tag != "latest", f"{image}: `latest` is not a pin"
    return tag


# ----------------------------------------------------------------------------- Dockerfiles
INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def runs(self) -> str:
        return "\n".join(i.args for i in self.all("RUN"))

    def args(self) -> dict[str, str]:
        return dict(i.args.split("=", 1) for i in self.all("ARG") if "=" in i.args)

    def _pairs(self, keyword: str) -> dict[str, str]:
        return dict(tok.split("=", 1) for i in self.all(keyword) for tok in shlex.split(i.args))

    def labels(self) -> dict[str, str]:
        return self._pairs("LABEL")

    def env(self) -> dict[str, str]:
        return self._pairs("ENV")


def instructions(path: Path) -> list[Instruction]:
    """Logical lines: comments dropped, backslash continuations joined (Docker's own rules)."""
    out, buf, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, args = (buf + line).partition(" ")
        out.append(Instruction(keyword, args.strip(), start))
        buf = ""
    assert not buf, f"{path}: ends inside a continued line"
    return out


def substitute(text: str, args: dict[str, str], where: str) -> str:
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in args, f"{where}: ${name} has no ARG default"
        return args[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


@cache
def dockerfile(kind: str) -> list[Stage]:
    """The stages, with their base images resolved from the ARGs before the first FROM."""
    path = DOCKERFILES[kind]
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions(path):
        where = f"{path.name}:{ins.line}"
        if ins.keyword == "FROM":
            tokens = [t for t in ins.args.split() if not t.startswith("--platform")]
            assert len(tokens) in (1, 3), f"{where}: FROM {ins.args}"
            name = tokens[2] if len(tokens) == 3 and tokens[1].upper() == "AS" else None
            stages.append(Stage(name, substitute(tokens[0], global_args, where)))
        elif not stages:
            assert ins.keyword == "ARG", f"{where}: only ARG may come before the first FROM"
            key, _, default = ins.args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(ins)
    assert stages, f"{path}: no FROM"
    return stages


def exec_form(ins: Instruction, path: Path) -> list[str]:
    """CMD/ENTRYPOINT/HEALTHCHECK in JSON (exec) form: signals reach the process, no shell between."""
    text = ins.args[ins.args.index("CMD ") + 4:] if ins.keyword == "HEALTHCHECK" else ins.args
    try:
        argv = json.loads(text)
    except json.JSONDecodeError:
        raise AssertionError(f"{path.name}:{ins.line}: {ins.keyword} is not in exec (JSON) form") from None
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), f"{path.name}:{ins.line}"
    return argv


def last(kind: str, keyword: str) -> list[str]:
    """The exec-form argv of the final stage's last CMD or HEALTHCHECK."""
    found = dockerfile(kind)[-1].all(keyword)
    assert found, f"{DOCKERFILES[kind].name}: no {keyword} in the final stage"
    return exec_form(found[-1], DOCKERFILES[kind])


def image_of(kind: str) -> str:
    """The name:tag a Dockerfile builds, from its final stage's OCI labels."""
    labels = dockerfile(kind)[-1].labels()
    return f"{labels['org.opencontainers.image.title']}:{labels['org.opencontainers.image.version']}"


def built_images() -> dict[str, str]:
    return {image_of(kind): kind for kind in DOCKERFILES}


def final_user(kind: str) -> int:
    users = dockerfile(kind)[-1].all("USER")
    name = DOCKERFILES[kind].name
    assert users, f"{name}: the final stage sets no USER, so it runs as root"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and gid.isdigit(), \
        f"{name}: USER {users[-1].args} is not numeric, so Kubernetes cannot verify runAsNonRoot"
    return int(uid)


def torch_pins(kind: str) -> dict[str, str]:
    builder = dockerfile(kind)[0]
    pins = {}
    for package in ("torch", "torchvision"):
        found = re.search(rf'"{package}==([^"+]+)(\+\w+)?"', builder.runs())
        assert found, f"{DOCKERFILES[kind].name}: {package} is not pinned with =="
        pins[package] = substitute(found.group(1), builder.args(), DOCKERFILES[kind].name)
    return pins


def python_version(kind: str) -> str:
    stages = dockerfile(kind)
    if stages[-1].base.startswith("python:"):
        return re.match(r"(\d+\.\d+\.\d+)", pinned_tag(stages[-1].base)).group(1)
    return stages[0].args()["PYTHON_VERSION"]  # a managed interpreter, installed by the builder


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_instructions_are_valid(kind):
    path = DOCKERFILES[kind]
    stages = dockerfile(kind)
    names = [s.name for s in stages if s.name]
    assert len(names) == len(set(names)), f"{path.name}: stage names repeat"
    assert len(stages) >= 2, f"{path.name}: not multi-stage (a builder and a slim runtime)"
    for index, stage in enumerate(stages):
        env = stage.env()
        for ins in stage.instructions:
            where = f"{path.name}:{ins.line}"
            assert ins.keyword in INSTRUCTIONS, f"{where}: {ins.keyword} is not a Dockerfile instruction"
            assert ins.keyword != "ADD", f"{where}: ADD fetches and unpacks implicitly; use COPY"
            if ins.keyword in ("CMD", "ENTRYPOINT", "HEALTHCHECK"):
                exec_form(ins, path)
            if ins.keyword == "COPY":
                source = next((t.split("=", 1)[1] for t in ins.args.split() if t.startswith("--from=")), None)
                earlier = {s.name for s in stages[:index]} | {str(i) for i in range(index)}
                assert source is None or source in earlier, f"{where}: COPY --from={source} is no earlier stage"
            for line in ins.args.split("&&") if ins.keyword == "RUN" else []:
                if "uv pip install" in line:
                    assert env.get("UV_NO_CACHE") == "1" or "--no-cache" in line, f"{where}: uv's cache stays"
                elif "pip install" in line:
                    assert env.get("PIP_NO_CACHE_DIR") == "1" or "--no-cache-dir" in line, f"{where}: pip's cache stays"
            if ins.keyword == "RUN" and "apt-get install" in ins.args:
                assert "--no-install-recommends" in ins.args and "rm -rf /var/lib/apt/lists" in ins.args, \
                    f"{where}: apt-get install without --no-install-recommends, or its lists left in the layer"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_basics(kind):
    """Pinned bases, a numeric non-root USER, a curl-free HEALTHCHECK, LABELs naming the image."""
    path = DOCKERFILES[kind]
    stages = dockerfile(kind)
    for stage in stages:
        if stage.base not in {s.name for s in stages}:
            pinned_tag(stage.base)
    final = stages[-1]
    uid = final_user(kind)
    assert uid != 0, f"{path.name}: the final stage runs as root"
    assert f"--uid {uid}" in final.runs(), f"{path.name}: no user with uid {uid} is created"
    healthcheck_url(last(kind, "HEALTHCHECK"))
    _, _, tag = image_of(kind).partition(":")
    assert tag == PYPROJECT["project"]["version"], f"{path.name}: image tag {tag} is not the project's version"
    check_command(last(kind, "CMD"), f"{path.name} CMD")
    for name in final.env():
        check_variable(name, f"{path.name} ENV")
        assert not SECRET_NAME.search(name), f"{path.name}: {name} would bake a secret into the image"
    # The venv's interpreter is a link into the builder's Python: the runtime must have the same one.
    copies_interpreter = any("/opt/python" in i.args for i in final.all("COPY"))
    assert copies_interpreter or stages[0].base == final.base, f"{path.name}: the venv's Python is not there"


def test_images_pin_the_same_python_and_torch():
    """Ray refuses nodes whose Python differs at the patch level; one torch reads every checkpoint."""
    assert python_version("cpu") == python_version("cuda")
    assert torch_pins("cpu") == torch_pins("cuda")
    required = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    for package, pin in torch_pins("cpu").items():
        assert required[package].specifier.contains(pin), f"{package}=={pin} is outside {required[package]}"
    cpu_builder = dockerfile("cpu")[0].runs()
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu_builder, "the CPU image takes CPU wheels"
    for kind in DOCKERFILES:
        builder = dockerfile(kind)[0].runs()
        assert re.search(r"install --no-deps -r /tmp/constraints\.txt", builder), f"{kind}: constraints unused"
        assert "pip check" in builder, f"{kind}: nothing checks that the pinned set is complete"


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line} is not an exact pin"
            pins[Requirement(name).name.lower().replace("_", "-")] = pinned
    return pins


def test_constraints_pin_every_dependency_within_range():
    pins = constraint_pins()
    deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["postgres"]
    for text in deps:
        req = Requirement(text)
        name = req.name.lower()
        if name in ("torch", "torchvision"):
            assert name not in pins, f"{name} is pinned per image in the Dockerfiles, not in constraints.txt"
            continue
        assert name in pins, f"{name} (pyproject.toml) is not pinned in docker/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
        if name == "psycopg":
            for extra in req.extras:  # psycopg[binary] is the package psycopg-binary
                assert f"psycopg-{extra}" in pins, f"psycopg[{extra}] needs psycopg-{extra} pinned"


# ----------------------------------------------------------------------------- .dockerignore
@cache
def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex)))
    return rules


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negate, regex in _dockerignore_rules():
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def copied_from_context(kind: str) -> set[str]:
    sources = set()
    for stage in dockerfile(kind):
        for ins in stage.all("COPY"):
            if not any(t.startswith("--from=") for t in ins.args.split()):
                sources.update([t for t in ins.args.split() if not t.startswith("--")][:-1])
    return sources


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_images_copy_what_the_wheel_build_needs(kind):
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "docker/constraints.txt", *packages}
    missing = needed - copied_from_context(kind)
    assert not missing, f"{DOCKERFILES[kind].name}: the build needs {sorted(missing)} (readme, packages, pins)"


def test_dockerignore_keeps_the_build_inputs_and_nothing_else():
    for source in set().union(*(copied_from_context(kind) for kind in DOCKERFILES)):
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file in the repository"
        files = [path] if path.is_file() else [f for f in path.rglob("*.py") if "__pycache__" not in f.parts]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not dockerignored(rel), f".dockerignore drops {rel}, which the Dockerfiles copy"
    for rel in [".venv/bin/python", ".git/HEAD", "runs/demo/encoder.pt", "bench-results/bench.json",
                "leoclr.egg-info/PKG-INFO", ".pytest_cache/README.md", "deploy/secrets.env",
                "leoclr_core/__pycache__/cli.cpython-311.pyc", "tests/unit/test_cli.py", "docker/Dockerfile"]:
        assert dockerignored(rel), f".dockerignore sends {rel} to the builder"


# ----------------------------------------------------------------------------- compose
@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@cache
def example_secrets() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / "secrets.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def render(value: Any) -> Any:
    """Compose's interpolation, each secret standing in as SECRET_<NAME>, defaults applied."""
    if isinstance(value, dict):
        return {k: render(v) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.groups()
        if name in example_secrets():
            return f"SECRET_{name}"
        assert op in (":-", "-"), f"compose: ${{{name}}} is neither in secrets.env.example nor defaulted"
        return arg

    return INTERPOLATION.sub(one, value)


@cache
def compose_services() -> dict[str, dict[str, Any]]:
    return render(compose()["services"])


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def service_argv(svc: dict[str, Any]) -> list[str]:
    command = svc.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def services_running(program: str, sub: str | None = None) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose_services().items()
            if service_argv(svc)[:1] == [program] and (sub is None or service_argv(svc)[1:2] == [sub])}


def test_compose_has_the_stack_and_a_scalable_worker():
    services = compose_services()
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "api"} <= set(services)
    worker = services["ray-worker"]
    # `--scale ray-worker=N` cannot give N containers one name or one host port.
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    assert "--head" in service_argv(services["ray-head"])
    for name, svc in services.items():
        assert not svc.get("privileged"), f"compose {name}: privileged"
        assert not svc.get("cap_add"), f"compose {name}: adds capabilities"
        limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("memory"), f"compose {name}: no memory limit"
    for name in services_running("ray"):
        assert services[name].get("shm_size"), f"compose {name}: Ray's object store needs more than 64 MB of /dev/shm"


def test_compose_healthchecks_and_start_order():
    services = compose_services()
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"compose {name}: no health check"
        depends = svc.get("depends_on") or {}
        for dep, cond in depends.items():
            assert dep in services, f"compose {name}: depends on unknown {dep}"
            assert cond.get("condition") == "service_healthy", f"compose {name}: starts before {dep} is healthy"
        # Every service named in this one's settings or command is healthy before this one starts.
        text = " ".join([*service_env(svc).values(), *service_argv(svc)])
        used = {other for other in services
                if other != name and re.search(rf"(//|@|=|^|\s){re.escape(other)}:\d", text)}
        assert used <= set(depends), f"compose {name}: uses {sorted(used - set(depends))} without depends_on"


def test_compose_secrets_come_from_the_env_file():
    assert example_secrets() and all(v == "" for v in example_secrets().values()), \
        "secrets.env.example lists the secrets and holds no values"
    assert "secrets.env" in (DEPLOY / ".gitignore").read_text().split(), "deploy/secrets.env is not git-ignored"
    raw = compose()["services"]
    for name, svc in compose_services().items():
        for key, value in service_env(svc).items():
            where = f"compose {name}: {key}"
            if SECRET_NAME.search(key):
                assert "SECRET_" in value, f"{where} is not interpolated from deploy/secrets.env"
                original = str(raw[name]["environment"][key])
                assert ":?" in original, f"{where} must stop compose when its secret is unset (${{NAME:?...}})"
            password = urlsplit(value).password if "://" in value else None
            assert password is None or password.startswith("SECRET_"), f"{where} holds a literal password"


def test_compose_commands_variables_and_images():
    built = built_images()
    for name, svc in compose_services().items():
        image = svc["image"]
        if "build" in svc:
            path = (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
            kind = next(k for k, p in DOCKERFILES.items() if p == path)
            assert image == image_of(kind), f"compose {name}: builds {image_of(kind)} but calls it {image}"
        elif image.split(":")[0] in THIRD_PARTY_IMAGES:
            pinned_tag(image)
        else:
            assert image in built, f"compose {name}: {image} is not built by docker/"
        argv = service_argv(svc)
        if argv:
            check_command(argv, f"compose {name}")
        for key in service_env(svc):
            check_variable(key, f"compose {name}", argv)
    for key in example_secrets():
        check_variable(key, "secrets.env.example")


def test_compose_shares_one_volume_for_checkpoints():
    nodes = {**services_running("ray"), **services_running("leoclr", "serve")}
    assert {"api", "ray-head", "ray-worker"} <= set(nodes)
    layouts = {}
    for name, svc in nodes.items():
        env = service_env(svc)
        storage, data_dir = env.get("LEOCLR_STORAGE_PATH"), env.get("LEOCLR_DATA_DIR")
        assert storage and data_dir, f"compose {name}: LEOCLR_STORAGE_PATH or LEOCLR_DATA_DIR unset"
        if storage.startswith(OBJECT_STORES):
            layouts[name] = (None, storage, data_dir)
            continue
        volume = next((v.split(":")[:2] for v in svc.get("volumes", [])
                       if storage.startswith(v.split(":")[1].rstrip("/") + "/")), None)
        assert volume, f"compose {name}: {storage} is not on a mounted volume"
        assert volume[0] in compose()["volumes"], f"compose {name}: {volume[0]} is not a named volume"
        layouts[name] = (tuple(volume), storage, data_dir)
    assert len(set(layouts.values())) == 1, f"compose: the nodes disagree on the shared volume: {layouts}"


def test_compose_databases():
    services = compose_services()
    pg = service_env(services["postgres"])
    job_store = urlsplit(service_env(services["api"])["LEOCLR_DATABASE_URL"])
    tracking = urlsplit(service_env(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"])
    for url in (job_store, tracking):
        # psycopg 3 is what the postgres extra installs; a plain postgresql:// would want psycopg2.
        assert url.scheme == "postgresql+psycopg", url.geturl()
        assert url.hostname == "postgres" and url.username == pg["POSTGRES_USER"], url.geturl()
    assert any(r.startswith("psycopg") for r in PYPROJECT["project"]["optional-dependencies"]["postgres"])
    mlflow_db = tracking.path.strip("/")
    assert job_store.path.strip("/") == pg["POSTGRES_DB"]
    assert mlflow_db != pg["POSTGRES_DB"], "MLflow and the job store both have a table named `jobs`"
    init = (DEPLOY / "postgres-init.sql").read_text()
    assert re.search(rf"CREATE DATABASE {mlflow_db}\b", init), "MLflow's database is never created"
    assert any(v.startswith("./postgres-init.sql:/docker-entrypoint-initdb.d/")
               for v in services["postgres"]["volumes"]), "the init script is not mounted"


# ----------------------------------------------------------------------------- Kubernetes
API = ApiClient()
CORE_MODELS = {("v1", "Namespace"): "V1Namespace", ("v1", "ConfigMap"): "V1ConfigMap",
               ("v1", "Secret"): "V1Secret", ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
               ("v1", "Service"): "V1Service", ("apps/v1", "Deployment"): "V1Deployment"}


@cache
def manifests() -> dict[str, list[dict[str, Any]]]:
    """Every YAML file in deploy/kuberay/ (examples included) -> its documents."""
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
            for p in sorted(KUBERAY.glob("*.yaml"))}


def kustomization() -> dict[str, Any]:
    return manifests()["kustomization.yaml"][0]


def applied_objects() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k` creates: the kustomization's resources."""
    return [d for f in kustomization()["resources"] for d in manifests()[f]]


def example_objects() -> list[dict[str, Any]]:
    return [d for name, docs in manifests().items() if name.endswith(".example.yaml") for d in docs]


def objects(kind: str) -> list[dict[str, Any]]:
    return [d for d in applied_objects() if d["kind"] == kind]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in objects(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _lost(given: Any, kept: Any, path: str) -> Iterator[str]:
    """Where the client's model did not keep what the manifest says: unknown fields, wrong types."""
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            yield f"{path}: an object where the schema has {type(kept).__name__}"
            return
        for key, value in given.items():
            if key not in kept:
                yield f"{path}.{key}: " + ("null" if value is None else "not a field of the schema")
            else:
                yield from _lost(value, kept[key], f"{path}.{key}")
    elif isinstance(given, list):
        if not isinstance(kept, list) or len(kept) != len(given):
            yield f"{path}: a list where the schema has {type(kept).__name__}"
            return
        for i, (g, k) in enumerate(zip(given, kept, strict=True)):
            yield from _lost(g, k, f"{path}[{i}]")
    elif given != kept:
        # Quantities are strings in the schema and the API accepts numbers for them; nothing else.
        quantity = isinstance(given, (int, float)) and not isinstance(given, bool) and kept == str(given)
        if not quantity:
            yield f"{path}: {given!r} has the wrong type (the schema makes it {kept!r})"


def schema_problems(obj: Any, model: str, where: str) -> list[str]:
    """`obj` read as the Kubernetes client's `model` (required fields enforced) and written back."""
    try:
        instance = API._ApiClient__deserialize(obj, model)
    except (ValueError, TypeError) as exc:
        return [f"{where}: {exc}"]
    return list(_lost(obj, API.sanitize_for_serialization(instance), where))


# KubeRay v1 fields (ray.io/v1: RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AutoscalerOptions,
# RayJobSpec): those these manifests use and their common siblings. Strings name Kubernetes models,
# validated as above; STR_MAP is map[string]string (so rayStartParams' numbers must be quoted).
STR_MAP = "map[string]string"
POD_TEMPLATE = "V1PodTemplateSpec"
AUTOSCALER_OPTIONS = {
    "resources": "V1ResourceRequirements", "image": str, "imagePullPolicy": str,
    "securityContext": "V1SecurityContext", "idleTimeoutSeconds": int,
    "upscalingMode": ("Default", "Aggressive", "Conservative"),
    "env": ["V1EnvVar"], "envFrom": ["V1EnvFromSource"], "volumeMounts": ["V1VolumeMount"],
}
HEAD_GROUP = {"rayStartParams": STR_MAP, "template": POD_TEMPLATE, "serviceType": str, "enableIngress": bool,
              "headService": "V1Service"}
WORKER_GROUP = {
    "groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "idleTimeoutSeconds": int,
    "numOfHosts": int, "rayStartParams": STR_MAP, "template": POD_TEMPLATE, "suspend": bool,
    "scaleStrategy": {"workersToDelete": [str]},
}
RAY_CLUSTER_SPEC = {
    "rayVersion": str, "enableInTreeAutoscaling": bool, "autoscalerOptions": AUTOSCALER_OPTIONS,
    "headGroupSpec": HEAD_GROUP, "workerGroupSpecs": [WORKER_GROUP], "headServiceAnnotations": STR_MAP,
    "suspend": bool, "managedBy": str,
}
RAY_JOB_SPEC = {
    "entrypoint": str, "runtimeEnvYAML": str, "clusterSelector": STR_MAP, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submissionMode": ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
    "submitterPodTemplate": POD_TEMPLATE, "submitterConfig": {"backoffLimit": int},
    "shutdownAfterJobFinishes": bool, "ttlSecondsAfterFinished": int, "activeDeadlineSeconds": int,
    "backoffLimit": int, "jobId": str, "metadata": STR_MAP, "suspend": bool, "entrypointNumCpus": float,
    "entrypointNumGpus": float, "entrypointResources": str, "managedBy": str,
}
REQUIRED = {id(HEAD_GROUP): {"template"}, id(RAY_CLUSTER_SPEC): {"headGroupSpec"},
            id(WORKER_GROUP): {"groupName", "template", "minReplicas", "maxReplicas"}}


def kuberay_problems(value: Any, schema: Any, where: str) -> Iterator[str]:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            yield f"{where}: not an object"
            return
        for key in sorted(REQUIRED.get(id(schema), set()) - set(value)):
            yield f"{where}.{key}: required"
        for key, item in value.items():
            if key in schema:
                yield from kuberay_problems(item, schema[key], f"{where}.{key}")
            else:
                yield f"{where}.{key}: not a KubeRay v1 field"
    elif isinstance(schema, list):
        if not isinstance(value, list):
            yield f"{where}: not a list"
            return
        for i, item in enumerate(value):
            yield from kuberay_problems(item, schema[0], f"{where}[{i}]")
    elif schema == STR_MAP:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            yield f"{where}: must map strings to strings (quote numbers and booleans)"
    elif isinstance(schema, str):
        yield from schema_problems(value, schema, where)
    elif isinstance(schema, tuple):
        if value not in schema:
            yield f"{where}: {value!r} is not one of {schema}"
    elif schema is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            yield f"{where}: not a number"
    elif not isinstance(value, schema) or (schema is int and isinstance(value, bool)):
        yield f"{where}: {value!r} is not a {schema.__name__}"


@dataclass
class Container:
    where: str
    role: str  # "deployment", "ray" (a Ray node: head or worker) or "submitter"
    pod: dict[str, Any]
    spec: dict[str, Any]

    @property
    def argv(self) -> list[str]:
        return [*self.spec.get("command", []), *self.spec.get("args", [])]


def pod_templates() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for doc in applied_objects():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Deployment":
            yield name, "deployment", doc["spec"]["template"]
        if doc["kind"] not in ("RayCluster", "RayJob"):
            continue
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else (doc["spec"].get("rayClusterSpec") or {})
        if cluster:
            yield f"{name} head", "ray", cluster["headGroupSpec"]["template"]
            for group in cluster.get("workerGroupSpecs", []):
                yield f"{name} {group['groupName']}", "ray", group["template"]
        if doc["kind"] == "RayJob" and doc["spec"].get("submitterPodTemplate"):
            yield f"{name} submitter", "submitter", doc["spec"]["submitterPodTemplate"]


def containers() -> list[Container]:
    return [Container(f"{where} {c['name']}", role, template["spec"], c)
            for where, role, template in pod_templates()
            for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]]


def running(program: str, sub: str) -> list[Container]:
    return [c for c in containers() if c.argv[:2] == [program, sub]]


def container_env(c: Container) -> dict[str, dict[str, Any]]:
    """name -> its env entry ({"value": ...} or {"valueFrom": ...}), ConfigMaps in envFrom included."""
    env = {}
    for source in c.spec.get("envFrom", []):
        assert "configMapRef" in source, f"{c.where}: envFrom other than a ConfigMap"
        data = one("ConfigMap", source["configMapRef"]["name"])["data"]
        env.update({k: {"value": v} for k, v in data.items()})
    env.update({e["name"]: e for e in c.spec.get("env", [])})
    return env


def container_port(c: Container, port: int | str) -> int:
    """A port number, or the number of the container's port with that name."""
    if isinstance(port, int):
        return port
    found = [p["containerPort"] for p in c.spec.get("ports", []) if p.get("name") == port]
    assert found, f"{c.where}: no port named {port}"
    return found[0]


def autoscaler_options() -> list[tuple[str, dict[str, Any]]]:
    return [(f"RayCluster/{d['metadata']['name']} autoscaler", d["spec"]["autoscalerOptions"])
            for d in objects("RayCluster") if d["spec"].get("enableInTreeAutoscaling")]


def test_every_manifest_parses_and_the_kustomization_lists_them():
    listed = kustomization()["resources"]
    files = set(manifests()) - {"kustomization.yaml"}
    examples = {f for f in files if f.endswith(".example.yaml")}
    assert len(listed) == len(set(listed)), "kustomization.yaml lists a file twice"
    unlisted, missing = sorted(files - examples - set(listed)), sorted(set(listed) - files)
    assert not unlisted and not missing, f"kustomization.yaml: not listed {unlisted}, no such file {missing}"
    assert "secret.example.yaml" in examples, "secret.example.yaml documents the Secrets the manifests read"
    for doc in [*applied_objects(), *example_objects()]:
        assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"].get("name"), doc
    assert [n["metadata"]["name"] for n in objects("Namespace")] == [kustomization()["namespace"]]


def test_core_objects_match_the_kubernetes_schema():
    problems, kinds = [], set()
    for filename, docs in manifests().items():
        for doc in docs:
            if doc["kind"] == "Kustomization" or doc["apiVersion"] == "ray.io/v1":
                continue
            model = CORE_MODELS.get((doc["apiVersion"], doc["kind"]))
            assert model, f"{filename}: nothing checks {doc['apiVersion']} {doc['kind']}"
            kinds.add(doc["kind"])
            problems += schema_problems(doc, model, f"{filename} {doc['kind']}/{doc['metadata']['name']}")
    assert not problems, "\n".join(problems)
    assert {"Deployment", "Service", "Secret", "ConfigMap", "PersistentVolumeClaim"} <= kinds


def test_kuberay_objects_use_known_fields():
    problems = []
    for kind, spec_schema in (("RayCluster", RAY_CLUSTER_SPEC), ("RayJob", RAY_JOB_SPEC)):
        for doc in objects(kind):
            where = f"{kind}/{doc['metadata']['name']}"
            assert doc["apiVersion"] == "ray.io/v1", where
            unknown = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
            problems += [f"{where}: unknown top-level {sorted(unknown)}"] if unknown else []
            problems += schema_problems(doc["metadata"], "V1ObjectMeta", f"{where}.metadata")
            problems += list(kuberay_problems(doc["spec"], spec_schema, f"{where}.spec"))
    assert not problems, "\n".join(problems)


def test_every_container_has_resources_and_runs_unprivileged():
    for c in containers():
        resources = c.spec.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{c.where}: no cpu/memory {part}"
        security, pod_security = c.spec.get("securityContext", {}), c.pod.get("securityContext", {})
        assert security.get("privileged") is not True, f"{c.where}: privileged"
        assert security.get("allowPrivilegeEscalation") is False, f"{c.where}: may escalate privileges"
        assert "ALL" in security.get("capabilities", {}).get("drop", []), f"{c.where}: keeps its capabilities"
        non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
        assert non_root is True, f"{c.where}: runAsNonRoot is not set"
        uid = security.get("runAsUser", pod_security.get("runAsUser"))
        expected = final_user(built_images().get(c.spec["image"], "cpu"))
        assert uid == expected, f"{c.where}: runAsUser {uid}, but the image's user is {expected}"
    for where, options in autoscaler_options():
        resources, security = options.get("resources", {}), options.get("securityContext", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})) & set(resources.get("limits", {})), where
        assert security.get("allowPrivilegeEscalation") is False and not security.get("privileged"), where


def test_images_are_the_ones_docker_builds():
    built = built_images()
    for c in containers():
        assert c.spec["image"] in built, f"{c.where}: {c.spec['image']} is not built by docker/ ({sorted(built)})"
    tags = dict(image.split(":") for image in built)
    mapped = kustomization().get("images", [])
    for entry in mapped:
        assert tags.get(entry["name"]) == entry.get("newTag"), f"kustomization.yaml images: {entry} is not built"
    assert {e["name"] for e in mapped} == set(tags), "every image needs its registry set in kustomization.yaml"


def test_kubernetes_commands_and_variables():
    for c in containers():
        if c.argv:
            check_command(c.argv, c.where)
        for name in container_env(c):
            check_variable(name, c.where, c.argv)
    for where, options in autoscaler_options():
        for entry in options.get("env", []):
            check_variable(entry["name"], where)
    for job in objects("RayJob"):
        where = f"RayJob/{job['metadata']['name']}"
        check_command(shlex.split(job["spec"]["entrypoint"]), f"{where} entrypoint")
        for name in yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}").get("env_vars", {}):
            check_variable(name, f"{where} runtimeEnvYAML")


def test_secrets_only_through_secret_refs():
    assert not objects("Secret"), "a Secret in the kustomization applies its values: keep it in *.example.yaml"
    keys: dict[str, set[str]] = {}
    for secret in (d for d in example_objects() if d["kind"] == "Secret"):
        name = secret["metadata"]["name"]
        keys[name] = set(secret.get("stringData", {}))
        for key, value in secret.get("stringData", {}).items():
            assert "REPLACE" in value, f"secret.example.yaml {name}.{key}: not a placeholder"
    entries = [(c.where, e) for c in containers() for e in c.spec.get("env", [])]
    entries += [(where, e) for where, options in autoscaler_options() for e in options.get("env", [])]
    for where, entry in entries:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if SECRET_NAME.search(entry["name"]):
            assert ref, f"{where}: {entry['name']} must come from a Secret"
        if ref:
            assert ref["key"] in keys.get(ref["name"], set()), \
                f"{where}: Secret {ref['name']} has no key {ref['key']} in secret.example.yaml"
        value = entry.get("value", "")
        assert "://" not in value or urlsplit(value).password is None, f"{where}: {entry['name']} holds a password"
    for configmap in objects("ConfigMap"):
        for key, value in configmap["data"].items():
            assert not SECRET_NAME.search(key), f"ConfigMap {configmap['metadata']['name']}: {key} is a secret"
            assert "://" not in value or urlsplit(value).password is None, f"ConfigMap: {key} holds a password"


def test_every_ray_pod_and_the_api_share_the_checkpoint_volume():
    nodes = [c for c in containers() if c.role == "ray"] + running("leoclr", "serve")
    assert len(nodes) == 1 + len(one("RayCluster")["spec"]["workerGroupSpecs"]) + 1, [c.where for c in nodes]
    layouts = set()
    for c in nodes:
        env = container_env(c)
        assert "LEOCLR_STORAGE_PATH" in env and "LEOCLR_DATA_DIR" in env, f"{c.where}: no storage settings"
        storage = env["LEOCLR_STORAGE_PATH"]["value"]
        if storage.startswith(OBJECT_STORES):
            layouts.add((None, None, storage, env["LEOCLR_DATA_DIR"]["value"]))
            continue
        mount = next((m for m in c.spec.get("volumeMounts", [])
                      if storage.startswith(m["mountPath"].rstrip("/") + "/")), None)
        assert mount, f"{c.where}: {storage} is not on a mounted volume"
        volume = next(v for v in c.pod["volumes"] if v["name"] == mount["name"])
        claim = volume["persistentVolumeClaim"]["claimName"]
        layouts.add((claim, mount["mountPath"], storage, env["LEOCLR_DATA_DIR"]["value"]))
    assert len(layouts) == 1, f"the pods disagree on the shared volume: {layouts}"
    claim_name = next(iter(layouts))[0]
    if claim_name is not None:
        claim = one("PersistentVolumeClaim", claim_name)
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "workers on several nodes write one checkpoint folder"


def test_api_and_mlflow_probes_and_services():
    [api] = running("leoclr", "serve")
    assert api.spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api.spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    [mlflow] = running("mlflow", "server")
    for probe in ("readinessProbe", "livenessProbe"):
        assert mlflow.spec[probe]["httpGet"]["path"] == "/health"
    for deployment in objects("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"Deployment {deployment['metadata']['name']}: selects no pod"
    for service in objects("Service"):
        name = service["metadata"]["name"]
        selected = [d for d in objects("Deployment")
                    if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} Deployments"
        [target] = [c for c in containers() if c.where.startswith(f"Deployment/{selected[0]['metadata']['name']} ")]
        for port in service["spec"]["ports"]:
            number = container_port(target, port["targetPort"])
            assert number in [p["containerPort"] for p in target.spec["ports"]], f"Service {name}: no port {number}"


def test_ray_cluster_shape():
    spec = one("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == dist_version("ray") == constraint_pins()["ray"], "one Ray everywhere"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert len(groups) == len(spec["workerGroupSpecs"]), "worker group names repeat"
    for group in [spec["headGroupSpec"], *groups.values()]:
        for key in group["rayStartParams"]:
            assert f"--{key}" in ray_start_options(), f"rayStartParams: `ray start` has no --{key}"
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], name

    def limits(group: dict) -> dict:
        return group["template"]["spec"]["containers"][0]["resources"]["limits"]

    gpu = [g for g in groups.values() if "nvidia.com/gpu" in limits(g)]
    cpu = [g for g in groups.values() if g not in gpu]
    assert gpu and cpu, "a CPU group for Ray Data and a GPU group for training"
    assert all(g["template"]["spec"]["containers"][0]["image"] == image_of("cuda") for g in gpu)
    assert all(g["template"]["spec"]["containers"][0]["image"] == image_of("cpu") for g in cpu)
    # KubeRay passes the value to `ray start --resources=` through a shell: JSON inside quotes.
    custom = [json.loads(json.loads(g["rayStartParams"]["resources"]))
              for g in cpu if "resources" in g["rayStartParams"]]
    assert any(r.get("data", 0) > 0 for r in custom), "the CPU group carries the `data` resource"


def test_ray_job_runs_the_demo_spec():
    from leoclr_core.contract import ENV_JOB_SPEC
    from leoclr_core.spec.models import load_spec, parse_spec

    spec = one("RayJob")["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": one("RayCluster")["metadata"]["name"]}
    assert shlex.split(spec["entrypoint"]) == ["leoclr", "run-job"], "the driver the API submits"
    raw = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"][ENV_JOB_SPEC]
    assert parse_spec(json.loads(raw)) == load_spec(ROOT / "configs" / "demo.yaml", []), "not configs/demo.yaml"
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_ray_token_reaches_every_ray_process():
    """Token auth: every Ray pod, the autoscaler, the RayJob submitter and the API have mode and token."""
    for c in containers():
        if c.argv[:2] == ["mlflow", "server"]:
            continue
        env = container_env(c)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{c.where}: RAY_AUTH_MODE is not token"
        assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}), f"{c.where}: no Ray token"
    for where, options in autoscaler_options():
        env = {e["name"]: e for e in options.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not token"
        assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}), f"{where}: no Ray token"
    for name, svc in {**services_running("ray"), **services_running("leoclr", "serve")}.items():
        env = service_env(svc)
        assert env.get("RAY_AUTH_MODE") == "token", f"compose {name}: RAY_AUTH_MODE is not token"
        assert env.get("RAY_AUTH_TOKEN") == "SECRET_RAY_AUTH_TOKEN", f"compose {name}: no Ray token"


def test_ray_reads_the_ray_variables_set_here():
    """The names Ray 2.60's token loader (C++, in _raylet.so) looks for, as whole C strings."""
    with open(_package_file("ray", "_raylet.so"), "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as binary:
            for name in RAY_VARIABLES:
                assert binary.find(name.encode() + b"\0") >= 0, f"Ray does not read {name}"


# ----------------------------------------------------------------------------- across files
def test_api_port_agrees_everywhere():
    from service.settings import ServiceSettings

    exposed = {int(p.split("/")[0]) for i in dockerfile("cpu")[-1].all("EXPOSE") for p in i.args.split()}
    port = int(flag(last("cpu", "CMD"), "--port"))
    assert port in exposed and url_port(healthcheck_url(last("cpu", "HEALTHCHECK"))) == port
    api = compose_services()["api"]
    assert int(flag(service_argv(api), "--port")) == port
    assert url_port(healthcheck_url(api["healthcheck"]["test"])) == port
    published = {int(p.split(":")[-2]): int(p.split(":")[-1]) for p in api["ports"]}
    assert port in published.values()
    default_url = ServiceSettings.model_fields["api_url"].default
    assert url_port(default_url) in published, "the CLI's default LEOCLR_API_URL misses the compose API"
    [k8s] = running("leoclr", "serve")
    assert int(flag(k8s.argv, "--port")) == port == container_port(k8s, "http")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container_port(k8s, k8s.spec[probe]["httpGet"]["port"]) == port, probe


def test_ray_ports_agree_everywhere():
    services = compose_services()
    head = service_argv(services["ray-head"])
    gcs, dashboard = int(flag(head, "--port")), int(flag(head, "--dashboard-port"))
    exposed = {int(p.split("/")[0]) for i in dockerfile("cpu")[-1].all("EXPOSE") for p in i.args.split()}
    assert {gcs, dashboard} <= exposed
    assert url_port(healthcheck_url(services["ray-head"]["healthcheck"]["test"])) == dashboard
    assert service_env(services["api"])["LEOCLR_RAY_JOBS_ADDRESS"] == f"http://ray-head:{dashboard}"
    for name, svc in services_running("ray").items():
        assert service_env(svc)["RAY_ADDRESS"] == f"ray-head:{gcs}", name
        if "--head" not in service_argv(svc):
            assert flag(service_argv(svc), "--address") == f"ray-head:{gcs}", name
            assert url_port(healthcheck_url(svc["healthcheck"]["test"])) == raylet_agent_port(), name
    assert flag(last("cuda", "CMD"), "--address") == f"ray-head:{gcs}"
    assert url_port(healthcheck_url(last("cuda", "HEALTHCHECK"))) == raylet_agent_port()

    cluster = one("RayCluster")
    params = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert params.get("port", str(gcs)) == str(gcs) and params.get("dashboard-port", str(dashboard)) == str(dashboard)
    [k8s_head] = [c for c in containers() if c.role == "ray" and c.where.split()[1] == "head"]
    assert container_port(k8s_head, "gcs-server") == gcs and container_port(k8s_head, "dashboard") == dashboard
    [k8s_api] = running("leoclr", "serve")
    assert container_env(k8s_api)["LEOCLR_RAY_JOBS_ADDRESS"]["value"] == \
        f"http://{cluster['metadata']['name']}-head-svc:{dashboard}", "KubeRay's head Service is <cluster>-head-svc"
    for c in containers():
        for probe in ("readinessProbe", "livenessProbe"):
            get = c.spec.get(probe, {}).get("httpGet", {})
            if get.get("path") == "/api/gcs_healthz":
                assert get["port"] == dashboard, f"{c.where} {probe}"
            if get.get("path") == "/api/local_raylet_healthz":
                assert get["port"] == raylet_agent_port(), f"{c.where} {probe}"


def test_mlflow_port_and_allowed_hosts_agree_everywhere():
    """MLflow answers only the Host headers in --allowed-hosts: the clients' URI must be one of them."""
    services = compose_services()
    server = service_argv(services["mlflow"])
    port = int(flag(server, "--port"))
    exposed = {int(p.split("/")[0]) for i in dockerfile("cpu")[-1].all("EXPOSE") for p in i.args.split()}
    assert port in exposed
    assert url_port(healthcheck_url(services["mlflow"]["healthcheck"]["test"])) == port
    uris = {service_env(s)["MLFLOW_TRACKING_URI"] for s in services.values() if "MLFLOW_TRACKING_URI" in service_env(s)}
    assert uris == {f"http://mlflow:{port}"}, uris
    allowed = flag(server, "--allowed-hosts").split(",")
    assert any(fnmatchcase(f"mlflow:{port}", a) for a in allowed), "compose: MLflow would refuse its clients"

    [k8s] = running("mlflow", "server")
    assert int(flag(k8s.argv, "--port")) == container_port(k8s, "http") == port
    service = one("Service", "leoclr-mlflow")
    uri = one("ConfigMap", "leoclr-config")["data"]["MLFLOW_TRACKING_URI"]
    assert url_host(uri) == service["metadata"]["name"] and url_port(uri) == service["spec"]["ports"][0]["port"]
    allowed = flag(k8s.argv, "--allowed-hosts").split(",")
    assert any(fnmatchcase(urlsplit(uri).netloc, a) for a in allowed), "Kubernetes: MLflow would refuse its clients"


def test_the_variable_table_is_generated_and_linked_from_the_deploy_guide():
    from service.envdoc import DOC, env_table, table_in

    assert DOC == ROOT / "docs" / "configuration.md"
    assert table_in(DOC.read_text()) == env_table(), "stale: run python -m service.envdoc"
    assert "../docs/configuration.md" in (DEPLOY / "README.md").read_text()
