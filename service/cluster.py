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
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

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
            try:
                os.kill(self.pid, 0)
            except OSError:
                return
            time.sleep(0.2)
        os.killpg(self.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token"}


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
