"""`leoclr submit --serve`: a `leoclr serve` started for one job and stopped after it.

The service runs as a child in its own session, so a Ctrl-C in the terminal reaches only the
client, which cancels its job over REST first and then stops the service (and with it the
embedded Ray head) with the same SIGINT a user would send it. The service is started as a
command (`python -m leoclr_core.cli serve`, added by the service's entry point), never imported.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from leoclr_core.cli.client import ApiClient, ClientSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def embedded_service(num_cpus: int | None = None, settings: ClientSettings | None = None,
                     timeout: float = 180.0) -> Iterator[ApiClient]:
    s = settings or ClientSettings()
    s.home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "leoclr_core.cli", "serve", "--port", str(port)]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    log_path = s.home / "serve.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "LEOCLR_DATA_DIR": str(s.home)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"leoclr serve exited with code {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"leoclr serve did not answer within {timeout:.0f} s; see {log_path}")
            try:
                client = ApiClient(url=url, settings=s)  # the token file exists once the app is up
                if client.healthy():
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        yield client
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn's clean shutdown; the embedded head stops with it
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
