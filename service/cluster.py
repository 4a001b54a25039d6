"""The embedded Ray head of `leoclr serve` when no RAY_ADDRESS is given.

It runs as `ray start --head --block`, a child process of the API, bound to 127.0.0.1 with token
auth; its addresses are recorded in the data directory. If the API dies without a clean stop
(SIGKILL), the head lives on with its jobs, and the next `leoclr serve` on the same data
directory finds and reuses it; a clean shutdown stops it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from leoclr_core import contract

log = logging.getLogger(__name__)


@dataclass
class EmbeddedHead:
    pid: int
    gcs_address: str
    dashboard_url: str
    owned: bool = True  # started by this process (stopped with it) or found running

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answers (a token-auth dashboard refuses us without the token: fine)
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        try:
            os.killpg(self.pid, signal.SIGTERM)  # the head and the processes it started
        except OSError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _running(self.pid):
                return
            time.sleep(0.2)
        os.killpg(self.pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether `pid` still runs. A head this process started stays a zombie, to which signal 0 still
    answers, until it is reaped: reap it here (else every stop waited out its whole timeout)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:  # not our child: a head found running, started by another process
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env() -> dict[str, str]:
    # The API process reads MLflow with short timeouts (service/tracking.py); a head it restarts must
    # not pass them on to training drivers, which get their own through the runner.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    # On SIGTERM a `ray start --block` node drains for up to 30 s so that Ray Serve replicas can move
    # (none here): with a finished job's Ray Data actors still leased, every stop of the service
    # waited the full 30 s. The embedded head stops with the service; there is nothing to drain to.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    # On Linux `ray start --node-ip-address=127.0.0.1` takes the machine's outward address instead
    # (Ray rewrites "localhost" addresses for multi-node clusters): the embedded head would listen
    # and advertise its node on the LAN. With this 0 Ray keeps 127.0.0.1; it only stops other nodes
    # joining, and the embedded head has none. Its drivers and workers inherit it, and so resolve
    # 127.0.0.1 the same way (leoclr_core.distributed sets it too).
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return contract.ray_environment(env)


def ensure_auth_token(ray: str) -> None:
    """Make sure the token the head and its clients share exists. `ray start` with token auth
    refuses to start without one, where `ray.init` makes its own: on a machine where nothing has
    run Ray yet, the embedded head would not start. Ray's own CLI creates it (~/.ray/auth_token,
    unless RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH name one), and only if none exists."""
    default = Path.home() / ".ray" / "auth_token"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_TOKEN") or (named and Path(named).is_file()) or default.is_file():
        return  # the usual case: asking Ray's CLI would cost every head start a 2 s Python start-up
    done = subprocess.run([ray, "get-auth-token", "--generate"], env=_ray_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    if done.returncode != 0:  # the token is a secret: stdout, which prints it, is never kept
        raise RuntimeError(f"could not create Ray's authentication token: {done.stderr.strip()[-500:]}")
    if default.exists():  # made here: readable by this user only, like the API token
        default.chmod(0o600)


# Ray's sockets live under its temp dir (`<dir>/session_<date>_<pid>/sockets/plasma_store`), and a
# Unix socket path may not exceed 107 bytes: a longer data directory gets a private folder in /tmp.
MAX_TEMP_DIR = 44


def session_dir(data_dir: Path) -> Path:
    """Where the embedded head keeps its session (logs of every job's driver included): in the data
    directory, readable by this user only, not in the world-readable /tmp/ray that Ray defaults to."""
    wanted = data_dir.resolve() / "ray-session"
    if len(str(wanted)) <= MAX_TEMP_DIR:
        wanted.mkdir(parents=True, exist_ok=True)
        wanted.chmod(0o700)
        return wanted
    link = data_dir / "ray-session"  # the short folder, found again from the data directory
    if link.is_symlink() and link.resolve().is_dir() and len(str(link.resolve())) <= MAX_TEMP_DIR:
        return link.resolve()
    short = Path(tempfile.mkdtemp(prefix="leoclr-ray-"))  # mode 0700
    if link.is_symlink():
        link.unlink()
    link.symlink_to(short, target_is_directory=True)
    return short


def ensure_head(data_dir: Path, num_cpus: int | None = None, timeout: float = 120.0) -> EmbeddedHead:
    """The recorded head if it still answers, else a new one."""
    record = data_dir / "ray-head.json"
    if record.is_file():
        try:
            head = EmbeddedHead(**{**json.loads(record.read_text()), "owned": False})
            if head.alive():
                log.warning("reusing the embedded Ray head at %s (pid %d)", head.gcs_address, head.pid)
                return head
        except (ValueError, TypeError):
            pass
    # Every port explicit: another Ray on this machine (a second data directory, a test cluster)
    # holds the defaults, and a dashboard agent that cannot bind its port cannot run jobs.
    port, dash, agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(6))
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
           "--disable-usage-stats", f"--num-cpus={num_cpus or os.cpu_count() or 1}"]
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd.append(f"--temp-dir={session_dir(data_dir)}")
    ensure_auth_token(ray)
    logf = open(data_dir / "ray-head.log", "ab")
    proc = subprocess.Popen(cmd, env=_ray_env(), stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    head = EmbeddedHead(proc.pid, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
    deadline = time.monotonic() + timeout
    while not head.alive():
        if proc.poll() is not None or time.monotonic() > deadline:
            head.stop()
            raise RuntimeError(f"the embedded Ray head did not start; see {data_dir / 'ray-head.log'}")
        time.sleep(0.5)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": head.pid, "gcs_address": head.gcs_address, "dashboard_url": head.dashboard_url}))
    tmp.replace(record)
    return head


class HeadSupervisor:
    """Restarts the embedded head when it dies (a crash, an OOM kill, a stray `ray stop`): at most
    `restarts` times in a row, each attempt logged, then it gives up and /readyz stays 503. The
    jobs the dead head ran are marked lost by the reconcile loop (the new head has no record of
    them); jobs still queued in the service go to the new head."""

    def __init__(self, data_dir: Path, head: EmbeddedHead, on_new_head: Callable[[EmbeddedHead], None],
                 num_cpus: int | None = None, restarts: int = 5, interval: float = 2.0):
        self.data_dir, self.head, self.on_new_head = data_dir, head, on_new_head
        self.num_cpus, self.restarts, self.interval = num_cpus, restarts, interval
        self.gave_up = False
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="leoclr-head-supervisor", daemon=True)

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval):
            if self.head.alive():
                continue
            log.warning("the embedded Ray head (pid %d, %s) is gone; restarting it", self.head.pid, self.head.gcs_address)
            self._restart()
            if self.gave_up:
                return

    def _restart(self) -> None:
        try:
            os.killpg(self.head.pid, signal.SIGKILL)  # what is left of the old head's processes
        except OSError:
            pass
        for attempt in range(1, self.restarts + 1):
            if self.stop_event.is_set():
                return
            try:
                head = ensure_head(self.data_dir, self.num_cpus)
            except (RuntimeError, OSError) as exc:
                log.error("restart %d of %d of the embedded Ray head failed: %s", attempt, self.restarts, exc)
                self.stop_event.wait(min(60.0, 2.0 ** attempt))
                continue
            head.owned = True  # started here, so stopped with the service
            self.head = head
            self.on_new_head(head)
            log.warning("the embedded Ray head is back (restart %d): %s, Jobs API %s", attempt, head.gcs_address,
                        head.dashboard_url)
            return
        log.error("gave up restarting the embedded Ray head after %d attempts; /readyz stays 503 "
                  "until the service is restarted", self.restarts)
        self.gave_up = True

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
