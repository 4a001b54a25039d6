"""What the chaos tier shares: a real `leoclr serve` on embedded defaults and its own data
directory, which a test kills in parts (the API, its Ray head, its MLflow server); every process
started for a test, directly or through the service (Ray heads, their workers, job drivers, an
MLflow server), killed at its end; and the figures each scenario prints.

Processes are found for the final kill by a marker variable in their environment, which every
descendant inherits (Ray's workers and drivers too), so a process orphaned by a kill is found as
well. Never `ray stop`: it would stop every Ray cluster on the machine, other people's included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx
import pytest

from ..e2e.conftest import clean_env, free_ports, tiny_pretrain, wait_healthy

REPO = Path(__file__).resolve().parents[2]
TOKEN = "chaos-token-0123456789"
H = {"Authorization": f"Bearer {TOKEN}"}
FINISHED = ("succeeded", "failed", "cancelled", "lost")
MARK = "LEOCLR_CHAOS_RUN"
GIB = 2**30
T = TypeVar("T")


def tiny_job(name: str, epochs: int = 1) -> dict[str, Any]:
    """The cheapest job that still goes through Ray Jobs and Ray Train: 128 images of 16 px, views
    made batched on the training worker's device (augment.device gpu: the CPU here), so it asks
    Ray for 2 CPUs (one worker, one for Ray Data's reads) and starts no view workers."""
    return tiny_pretrain(
        name, epochs,
        data={"num_images": 128, "num_test_images": 32, "image_size": 16,
              "synthetic": {"source_size": 32, "object_size": [13, 19]}},
        augment={"device": "gpu", "batched": True})


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as exc:
        return f"({path}: {exc})"


def _environ(pid: int) -> dict[bytes, bytes]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return {k: v for k, _, v in (item.partition(b"=") for item in raw.split(b"\0") if item)}


def marked(mark: str) -> list[int]:
    """Pids of this user's processes whose environment carries `mark`: everything one test started.
    Read from /proc (this tier runs where Ray's embedded head does: Linux)."""
    want, found = mark.encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if _environ(int(entry.name)).get(MARK.encode()) == want:
                    found.append(int(entry.name))
            except OSError:  # another user's process, or gone meanwhile
                continue
    return found


def kill_marked(mark: str, timeout: float = 20.0) -> int:
    """SIGKILL every marked process until none is left (a zombie keeps its environment until its
    parent reaps it, so it is only waited on); returns how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while (pids := [p for p in marked(mark) if not _zombie(p)]) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        time.sleep(0.5)
    return len(killed)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def pss(pids: list[int]) -> int:
    """Bytes of memory the processes hold, shared pages (libtorch, mapped by every Ray worker)
    counted once across them: the proportional set size, not the RSS, which counts them per process."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            continue
    return total


def machine_used() -> int:
    """Bytes in use on the machine: MemTotal - MemAvailable, as `free` computes it."""
    lines = Path("/proc/meminfo").read_text().splitlines()
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines}
    return info["MemTotal"] - info["MemAvailable"]


class MemorySampler:
    """Samples, every `interval` seconds in a thread, the memory of one test's processes (PSS) and
    of the whole machine (which other work on it shares), keeping the peaks."""

    def __init__(self, mark: str, interval: float = 1.0):
        self.mark, self.interval = mark, interval
        self.base_tree, self.base_machine = pss(marked(mark)), machine_used()
        self.peak_tree, self.peak_machine, self.last_tree = self.base_tree, self.base_machine, self.base_tree
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="chaos-memory")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last_tree = pss(marked(self.mark))
            self.peak_tree = max(self.peak_tree, self.last_tree)
            self.peak_machine = max(self.peak_machine, machine_used())
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@dataclass
class Service:
    """A `leoclr serve` on `data` (embedded Ray head, SQLite job store, MLflow on SQLite unless the
    environment names a server), which a test may SIGKILL and start again on the same port."""

    data: Path
    mark: str
    num_cpus: int
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        [self.port] = free_ports()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = clean_env(LEOCLR_DATA_DIR=str(self.data), LEOCLR_API_TOKEN=TOKEN, **{MARK: self.mark},
                             **self.extra_env)
        self.proc: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, headers=H, timeout=30)

    # ------------------------------------------------------------------ processes
    def start(self, timeout: float = 180) -> float:
        """Start the API (in its own session, like a service manager would) and wait for /healthz;
        returns the seconds that took."""
        started = time.monotonic()
        with open(self.data / "serve.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "leoclr_core.cli", "serve", "--port", str(self.port),
                 "--num-cpus", str(self.num_cpus)],
                env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.url, self.proc, self.data / "serve.log", timeout=timeout)
        return time.monotonic() - started

    def kill_api(self) -> None:
        """SIGKILL the API process alone: its embedded head runs in a session of its own and lives on."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def head(self) -> dict[str, Any]:
        return json.loads((self.data / "ray-head.json").read_text())

    def log(self) -> str:
        """The end of the service's log without uvicorn's access lines (a test's polling fills it with them)."""
        lines: list[str] = []
        for line in tail(self.data / "serve.log", 500_000).splitlines():
            if '" 200 OK' not in line and (not lines or line != lines[-1]):
                lines.append(line)
        return ("--- serve.log (end, without 200 OK access lines and repeats) ---\n" + "\n".join(lines)[-3000:]
                + f"\n--- ray-head.log (end) ---\n{tail(self.data / 'ray-head.log', 1500)}")

    def stop(self) -> int:
        """Everything this service started, gone: the API, then each Ray head it recorded by its
        process group (SIGTERM, so Ray cleans up), then any marked process left (SIGKILL)."""
        self.http.close()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        record = self.data / "ray-head.json"
        if record.is_file():
            pid = json.loads(record.read_text())["pid"]
            if pid in marked(self.mark):  # ours, not a pid reused since
                os.killpg(pid, signal.SIGTERM)
                deadline = time.monotonic() + 20
                while pid in marked(self.mark) and not _zombie(pid) and time.monotonic() < deadline:
                    time.sleep(0.5)
        return kill_marked(self.mark)

    # ------------------------------------------------------------------ API
    def readyz(self) -> int:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=10).status_code
        except httpx.HTTPError:
            return 0

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post("/v1/jobs", json=spec)
        assert r.status_code == 201, f"POST /v1/jobs answered {r.status_code}: {r.text}\n{self.log()}"
        return r.json()

    def job(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        r = self.http.get(f"/v1/jobs/{job_id}", timeout=timeout)
        assert r.status_code == 200, f"GET /v1/jobs/{job_id} answered {r.status_code}: {r.text}"
        return r.json()

    def jobs(self) -> dict[str, dict[str, Any]]:
        """Every job the store reports, by id."""
        r = self.http.get("/v1/jobs", params={"limit": 500})
        assert r.status_code == 200, f"GET /v1/jobs answered {r.status_code}: {r.text}"
        return {j["id"]: j for j in r.json()["items"]}

    def cancel_all(self) -> None:
        """Best effort, when a test gives up early: no job left holding the machine's memory."""
        try:
            for job_id, job in self.jobs().items():
                if job["status"] not in FINISHED:
                    self.http.post(f"/v1/jobs/{job_id}/cancel")
        except (httpx.HTTPError, AssertionError):
            pass

    def until(self, check: Callable[[], T | None], timeout: float, what: str, interval: float = 1.0) -> T:
        """Poll `check` until it returns something other than None; after `timeout` s, fail with
        `what` and the end of the service's logs."""
        deadline = time.monotonic() + timeout
        while True:
            got = check()
            if got is not None:
                return got
            if time.monotonic() > deadline:
                try:  # what the service says of its jobs then: queued by the gate (and why), or in Ray
                    seen = "\n".join(f"job {j['id']}: {j['status']} {j.get('error') or ''}"[:500]
                                     for j in self.jobs().values())
                except Exception as exc:  # noqa: BLE001 - the failure is the point; this is context
                    seen = f"(the job list could not be read: {exc})"
                pytest.fail(f"{what}: not within {timeout:.0f} s\n{seen}\n{self.log()}")
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"{what}: `leoclr serve` exited with code {self.proc.returncode}\n{self.log()}")
            time.sleep(interval)

    def all_finished(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        def done() -> dict[str, dict[str, Any]] | None:
            jobs = self.jobs()
            return jobs if all(jobs.get(i, {}).get("status") in FINISHED for i in ids) else None

        try:
            return self.until(done, timeout, f"the {len(ids)} jobs to finish")
        except pytest.fail.Exception:
            jobs = self.jobs()
            pytest.fail(f"the {len(ids)} jobs did not all finish within {timeout:.0f} s: "
                        f"{ {i: jobs.get(i, {}).get('status', 'not reported') for i in ids} }\n{self.log()}")


@pytest.fixture
def make_service(tmp_path):
    """make_service(num_cpus, **env) -> a started Service; every one is stopped, with all it
    started, when the test ends."""
    made: list[Service] = []

    def make(num_cpus: int, start: bool = True, **env: str) -> Service:
        svc = Service(tmp_path / f"data{len(made)}", f"{uuid.uuid4().hex}", num_cpus, env)
        svc.data.mkdir()
        made.append(svc)
        if start:
            svc.start()
        return svc

    yield make
    for svc in made:
        svc.stop()


@pytest.fixture
def mark() -> str:
    """A marker of one test's own processes that are not a service's (an MLflow server)."""
    m = uuid.uuid4().hex
    yield m
    kill_marked(m)


_FIGURES: list[str] = []


@pytest.fixture
def figures() -> Callable[[str], None]:
    """figures(line): printed at once and again at the end of the session."""
    def say(line: str) -> None:
        line = f"chaos {line}"
        _FIGURES.append(line)
        print(line, flush=True)
    return say


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("chaos figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
