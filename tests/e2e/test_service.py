"""The real service: `leoclr serve` with its embedded Ray head, jobs submitted over REST and run as
Ray Jobs, followed to their end; models pulled from the registry in a fresh process; a cancel; the
API SIGKILLed mid-job and restarted; `leoclr submit --serve` (the README's main command) stopped
with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import clean_env, free_ports, tiny_pretrain, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
TOKEN = "e2e-token-0123456789"
H = {"Authorization": f"Bearer {TOKEN}"}


def tiny_spec(name: str, epochs: int = 2, register: bool = False) -> dict:
    extra = {"register": {"model_name": "e2e-encoder", "alias": "candidate"}} if register else {}
    return tiny_pretrain(name, epochs, **extra)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class Service:
    """A `leoclr serve` process on a data directory; killed and started again by the tests."""

    def __init__(self, data: Path):
        self.data, [self.port] = data, free_ports()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = clean_env(LEOCLR_DATA_DIR=str(data), LEOCLR_API_TOKEN=TOKEN)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.data / "serve.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "leoclr_core.cli", "serve", "--port", str(self.port), "--num-cpus", "4"],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.proc, self.data / "serve.log")

    def log(self) -> str:
        return (self.data / "serve.log").read_text()[-3000:]

    def head_pid(self) -> int:
        return json.loads((self.data / "ray-head.json").read_text())["pid"]

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=H, timeout=30, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", headers=H, timeout=30, **kw)

    def wait(self, job_id: str, until: tuple[str, ...], timeout: float = 400) -> tuple[dict, set[str]]:
        deadline, seen = time.monotonic() + timeout, set()
        while True:
            job = self.get(f"/v1/jobs/{job_id}").json()
            seen.add(job["status"])
            if job["status"] in until:
                return job, seen
            assert time.monotonic() < deadline, (job, self.log())
            time.sleep(1)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("service-data"))
    svc.start()
    yield svc
    if svc.proc.poll() is None:
        svc.proc.send_signal(signal.SIGINT)  # a clean stop also stops the head it started
        svc.proc.wait(timeout=90)
    head = svc.head_pid()
    if _alive(head):  # a head found again after a restart is not the new process's to stop
        os.killpg(head, signal.SIGTERM)


def test_a_job_goes_from_queued_to_succeeded_and_its_model_loads(service):
    spec = tiny_spec("e2e-demo", register=True)
    assert httpx.post(f"{service.url}/v1/jobs", json=spec).status_code == 401
    r = service.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued"
    job, seen = service.wait(job["id"], ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job.get("error")
    assert "running" in seen
    assert job["result"]["registry_uri"] == "models:/e2e-encoder@candidate"
    p = job["progress"]
    assert (p["step"], p["epoch"], p["epochs"]) == (p["total_steps"], 2, 2) and p["loss"] > 0
    assert p["mlflow_run_id"] == job["result"]["mlflow_run_id"] and p["model_version"] == "1"
    history = service.get(f"/v1/jobs/{job['id']}/metrics", params={"key": "epoch/loss"}).json()
    assert [x["step"] for x in history["metrics"]["epoch/loss"]] == [1, 2]
    assert "epoch 2/2" in service.get(f"/v1/jobs/{job['id']}/logs").text
    [model] = service.get("/v1/models").json()["items"]
    assert model["aliases"] == {"candidate": "1"} and model["versions"][0]["job_id"] == job["id"]

    code = ("import mlflow, torch\n"
            "m = mlflow.pytorch.load_model('models:/e2e-encoder@candidate')\n"
            "print(tuple(m(torch.rand(2, 3, 16, 16)).shape))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/",
                         env={**service.env, "MLFLOW_TRACKING_URI": f"sqlite:///{service.data}/mlflow.db"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(2, 64)"

    cli = subprocess.run([sys.executable, "-m", "leoclr_core.cli", "status", job["id"]], capture_output=True,
                         text=True, timeout=60, env={**service.env, "LEOCLR_API_URL": service.url})
    assert cli.returncode == 0 and json.loads(cli.stdout)["status"] == "succeeded", cli.stderr


def test_cancel_stops_the_ray_job_and_its_mlflow_run(service):
    job = service.post("/v1/jobs", json=tiny_spec("e2e-cancel", epochs=500)).json()
    job, _ = service.wait(job["id"], ("running",))
    deadline = time.monotonic() + 120  # running on Ray; wait until training has started logging
    while not (service.get(f"/v1/jobs/{job['id']}").json().get("progress") or {}).get("step"):
        assert time.monotonic() < deadline, service.log()
        time.sleep(1)
    r = service.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert service.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    code = ("import mlflow, sys, time\n"
            f"c = mlflow.MlflowClient('sqlite:///{service.data}/mlflow.db')\n"
            "exp = c.get_experiment_by_name('e2e-cancel')\n"
            "for _ in range(60):\n"
            "    [run] = c.search_runs([exp.experiment_id])\n"
            "    if run.info.status != 'RUNNING': break\n"
            "    time.sleep(1)\n"
            "print(run.info.status)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "KILLED", out.stderr[-2000:]


def test_the_api_killed_mid_job_and_restarted_follows_the_job_to_its_end(service):
    before = {j["id"]: j["status"] for j in service.get("/v1/jobs").json()["items"]}
    job = service.post("/v1/jobs", json=tiny_spec("e2e-survivor", epochs=6)).json()
    service.wait(job["id"], ("running",))
    service.proc.send_signal(signal.SIGKILL)
    service.proc.wait()
    head = service.head_pid()
    assert _alive(head)  # the head and its job outlive the API
    service.start()  # same data directory: finds the head and the job again
    after = {j["id"]: j["status"] for j in service.get("/v1/jobs").json()["items"]}
    assert after == {**before, job["id"]: "running"}
    done, seen = service.wait(job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done.get("error")
    assert done["result"]["epoch"] == 6 and service.head_pid() == head
    assert service.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


def test_submit_serve_runs_a_job_and_ctrl_c_stops_everything(tmp_path):
    """`leoclr submit SPEC --serve` (what `make run` calls): interrupted mid-job, it cancels the job,
    stops the service and its Ray head, and exits 130."""
    spec = tmp_path / "long.json"
    spec.write_text(json.dumps(tiny_spec("e2e-interrupted", epochs=500)))
    env = clean_env(LEOCLR_DATA_DIR=str(tmp_path / "data"), LEOCLR_API_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "leoclr_core.cli", "submit", str(spec), "--serve"], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # until the job runs on the embedded head
        lines.append(line)
        if ": running" in line:
            break
    assert proc.poll() is None, "".join(lines)
    head = json.loads((tmp_path / "data" / "ray-head.json").read_text())["pid"]
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # say what it printed, and leave no cluster to the next tests
        proc.kill()
        rest, _ = proc.communicate()
        os.killpg(head, signal.SIGKILL)
        pytest.fail("Ctrl-C did not stop `leoclr submit --serve` within 180 s; it printed:\n"
                    + ("".join(lines) + rest)[-6000:])
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "cancelling job" in out
    deadline = time.monotonic() + 30
    while _alive(head):
        assert time.monotonic() < deadline, "the embedded Ray head outlived Ctrl-C"
        time.sleep(0.5)
    sys.path.insert(0, str(REPO))
    from service.store import JobStore

    [job], _ = JobStore(f"sqlite:///{tmp_path}/data/jobs.db").list()
    assert job.status == "cancelled"
