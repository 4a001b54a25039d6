"""How long `leoclr serve` takes from process start to its first answer on /healthz, with the Ray
head given (LEOCLR_RAY_JOBS_ADDRESS), so no embedded head is started. The address given is a port
nothing listens on: the service starts without its cluster (/readyz says 503), which is what is
measured here, the API's own start-up.

    python -m bench.serve_start [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_healthz(leoclr: str, timeout: float = 60.0) -> float:
    """Seconds from starting `leoclr serve` to a 200 from /healthz (polled every 10 ms)."""
    port, closed = free_port(), free_port()
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "LEOCLR_DATA_DIR": data, "LEOCLR_API_TOKEN": "bench",
               "LEOCLR_RAY_JOBS_ADDRESS": f"http://127.0.0.1:{closed}"}
        started = time.perf_counter()
        proc = subprocess.Popen([leoclr, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while time.perf_counter() - started < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"leoclr serve exited with {proc.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                        if r.status == 200:
                            return time.perf_counter() - started
                except (urllib.error.URLError, ConnectionError):
                    pass
                time.sleep(0.01)
            raise TimeoutError(f"no answer on /healthz within {timeout:g} s")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    leoclr = str(Path(sys.executable).with_name("leoclr"))  # the installed CLI, as a user starts it
    times = [time_to_healthz(leoclr) for _ in range(args.runs)]
    print("leoclr serve -> /healthz: " + ", ".join(f"{t:.2f}" for t in times)
          + f" s (median {statistics.median(times):.2f} s, max {max(times):.2f} s)")


if __name__ == "__main__":
    main()
