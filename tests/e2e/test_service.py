"""The real service: `leoclr serve` with its embedded Ray head, jobs submitted over REST and run as
Ray Jobs, followed to their end; models pulled from the registry in a fresh process; a cancel; the
API SIGKILLed mid-job and restarted; `leoclr submit --serve` (the README's main command) stopped
with Ctrl-C.

The service runs in two configurations, and every test of it on both: `embedded` (the defaults: the
job store and MLflow on SQLite, checkpoints on the local disk) and `production` (the job store on a
PostgreSQL server, MLflow as a tracking server on PostgreSQL with its artifacts on S3, proxied, and
Ray Train's checkpoints on S3; tests/backends.py starts the servers). The service, its Ray head and
through them the drivers and workers get the S3 variables from their environment, never from a spec.
Production alone: a search through the API while the tracking server is down at submit, and the S3
secret looked for everywhere a user or another process could read it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.backends import S3_SECRET, MlflowServer, S3Server, start_mlflow

from .conftest import clean_env, free_ports, tiny_pretrain, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
TOKEN = "e2e-token-0123456789"
H = {"Authorization": f"Bearer {TOKEN}"}
FINISHED = ("succeeded", "failed", "cancelled", "lost")
PRODUCTION_ONLY = pytest.mark.parametrize("service", ["production"], indirect=True)


def tiny_spec(name: str, epochs: int = 2, register: bool = False) -> dict:
    extra = {"register": {"model_name": "e2e-encoder", "alias": "candidate"}} if register else {}
    return tiny_pretrain(name, epochs, **extra)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def bare_env(tracking_uri: str) -> dict[str, str]:
    """A user's process that knows only where MLflow is: no storage credentials or endpoint, no data
    directory, no Ray (with a tracking server, artifacts come through it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "LEOCLR_", "RAY_"))}
    return {**env, "MLFLOW_TRACKING_URI": tracking_uri}


def mlflow_script(tracking_uri: str, body: str) -> str:
    """Runs `body` (with `c`, an MlflowClient of `tracking_uri`) in a fresh process; its stdout.
    A subprocess: MLflow's client keeps process-wide state this test process must not carry."""
    code = f"import json, sys, time\nimport mlflow\nc = mlflow.MlflowClient({tracking_uri!r})\n{body}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         env=bare_env(tracking_uri))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@dataclass
class Production:
    """The servers behind the production configuration: a job-store database, an MLflow server
    (PostgreSQL backend, artifacts on S3 under `mlflow/`) and Ray Train's storage (`ray/`), in one bucket."""

    database_url: str
    s3: S3Server
    bucket: str
    mlflow: MlflowServer

    @property
    def storage(self) -> str:
        return f"s3://{self.bucket}/ray"

    def env(self) -> dict[str, str]:
        return {"LEOCLR_DATABASE_URL": self.database_url, "MLFLOW_TRACKING_URI": self.mlflow.url,
                "LEOCLR_STORAGE_PATH": self.storage, **self.s3.env()}

    def keys(self, prefix: str) -> list[str]:
        return self.s3.keys(self.bucket, prefix)


class Service:
    """A `leoclr serve` process on a data directory; killed and started again by the tests."""

    def __init__(self, data: Path, production: Production | None = None):
        self.data, self.production, [self.port] = data, production, free_ports()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tracking_uri = production.mlflow.url if production else f"sqlite:///{data}/mlflow.db"
        self.env = clean_env(LEOCLR_DATA_DIR=str(data), LEOCLR_API_TOKEN=TOKEN,
                             **(production.env() if production else {}))
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


@pytest.fixture(scope="module", params=["embedded", "production"])
def service(request, tmp_path_factory):
    production, mlflow = None, None
    if request.param == "production":
        postgres, s3 = request.getfixturevalue("postgres"), request.getfixturevalue("s3")
        bucket = s3.bucket("e2e")
        mlflow = start_mlflow(postgres.database("mlflow"), artifacts=f"s3://{bucket}/mlflow", env=s3.env())
        production = Production(postgres.database("jobs"), s3, bucket, mlflow)
    svc = Service(tmp_path_factory.mktemp(f"service-{request.param}"), production)
    try:
        svc.start()
        yield svc
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGINT)  # a clean stop also stops the head it started
            svc.proc.wait(timeout=90)
        if (svc.data / "ray-head.json").is_file():
            head = svc.head_pid()
            if _alive(head):  # a head found again after a restart is not the new process's to stop
                os.killpg(head, signal.SIGTERM)
        if mlflow is not None:
            mlflow.stop()


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

    # A user's process that knows only the tracking URI (with a server: no S3 credentials either).
    code = ("import mlflow, torch\n"
            "m = mlflow.pytorch.load_model('models:/e2e-encoder@candidate')\n"
            "print(tuple(m(torch.rand(2, 3, 16, 16)).shape))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd="/",
                         env=bare_env(service.tracking_uri))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(2, 64)"

    cli = subprocess.run([sys.executable, "-m", "leoclr_core.cli", "status", job["id"]], capture_output=True,
                         text=True, timeout=60, env={**service.env, "LEOCLR_API_URL": service.url})
    assert cli.returncode == 0 and json.loads(cli.stdout)["status"] == "succeeded", cli.stderr

    if service.production:  # where the bytes went: Ray Train's checkpoints and MLflow's artifacts, in the bucket
        prod = service.production
        assert p["mlflow_run_url"].startswith(prod.mlflow.url), p
        checkpoints = [k for k in prod.keys("ray/") if "/checkpoint_" in k]
        assert checkpoints, prod.keys("ray/")[:50]
        artifacts = prod.keys("mlflow/")
        assert any(k.endswith("/MLmodel") for k in artifacts), artifacts[:50]  # the logged encoder
        assert any(k.endswith(".pt") and "/checkpoints/" in k for k in artifacts), artifacts[:50]
        assert not [p.name for p in service.data.iterdir() if p.name in ("jobs.db", "mlflow.db", "mlartifacts", "ray")]


def test_cancel_stops_the_ray_job_and_its_mlflow_run(service):
    job = service.post("/v1/jobs", json=tiny_spec("e2e-cancel", epochs=500)).json()
    job, _ = service.wait(job["id"], ("running",))
    deadline = time.monotonic() + 120  # running on Ray; wait until training has started logging
    while not ((live := service.get(f"/v1/jobs/{job['id']}").json()).get("progress") or {}).get("step"):
        assert time.monotonic() < deadline, service.log()
        time.sleep(1)
    # live progress, read from the tracking store (with a server: over HTTP, its UI linked)
    assert live["status"] == "running" and live["progress"]["mlflow_run_url"].startswith(
        service.tracking_uri if service.production else "runs:/"), live
    r = service.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert service.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    out = mlflow_script(service.tracking_uri, (
        "exp = c.get_experiment_by_name('e2e-cancel')\n"
        "for _ in range(60):\n"
        "    [run] = c.search_runs([exp.experiment_id])\n"
        "    if run.info.status != 'RUNNING': break\n"
        "    time.sleep(1)\n"
        "print(run.info.status)\n"))
    assert out.strip().splitlines()[-1] == "KILLED"


# On the production configuration only: the chaos tier's api-kill drill (tests/chaos/test_api_kill.py)
# kills the API of an embedded-defaults service with jobs queued and running, in every CI run.
@PRODUCTION_ONLY
def test_the_api_killed_mid_job_and_restarted_follows_the_job_to_its_end(service):
    before = {j["id"]: j["status"] for j in service.get("/v1/jobs").json()["items"]}
    job = service.post("/v1/jobs", json=tiny_spec("e2e-survivor", epochs=6)).json()
    service.wait(job["id"], ("running",))
    service.proc.send_signal(signal.SIGKILL)
    service.proc.wait()
    head = service.head_pid()
    assert _alive(head)  # the head and its job outlive the API
    service.start()  # same data directory and job store: finds the head and the job again
    after = {j["id"]: j["status"] for j in service.get("/v1/jobs").json()["items"]}
    assert after == {**before, job["id"]: "running"}
    done, seen = service.wait(job["id"], FINISHED)
    assert done["status"] == "succeeded", done.get("error")
    assert done["result"]["epoch"] == 6 and service.head_pid() == head
    assert service.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


def search_spec() -> dict:
    """Two trials of one epoch at once, each asking for 1.5 of the service's 4 CPUs (its worker makes
    the views), ranked by loss; no scheduler: each trial runs its one epoch."""
    base = tiny_pretrain("e2e-search-base", 1, augment={"device": "gpu", "batched": True},
                         scaling={"cpus_per_worker": 0.5})
    return {"kind": "tune", "name": "e2e-search", "base": base,
            "space": {"optim.lr": {"type": "grid", "values": [0.03, 0.1]}}, "num_samples": 1,
            "metric": "loss", "scheduler": {"type": "none"}, "max_concurrent_trials": 2,
            "register": {"model_name": "e2e-search-best", "alias": "candidate"}}


@PRODUCTION_ONLY
def test_a_search_submitted_while_mlflow_is_down_waits_then_runs_on_the_server(service):
    """The tracking server is down at submit: the job is kept, `queued`, its error naming MLflow, and
    reads answer at once; once the server is back the search runs: a parent run and a child run per
    trial on the server, the best trial's encoder registered."""
    server = service.production.mlflow
    server.stop()
    try:
        r = service.post("/v1/jobs", json=search_spec())
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["status"] == "queued" and "MLflow" in job["error"] and server.url in job["error"], job
        time.sleep(3)  # a pass of the reconcile loop (every 2 s): it does not hand the job to Ray either
        asked = time.monotonic()
        job = service.get(f"/v1/jobs/{job['id']}").json()
        assert time.monotonic() - asked < 10, "a read hung on the MLflow server being down"
        assert job["status"] == "queued" and "MLflow" in job["error"], job
        assert "MLflow" in job["tracking_error"] and job["progress"] is None, job
        assert job["id"] in {j["id"] for j in service.get("/v1/jobs").json()["items"]}
    finally:
        server.start()
    done, _ = service.wait(job["id"], FINISHED, timeout=600)
    assert done["status"] == "succeeded" and not done["error"], done
    result, trials = done["result"], done["progress"]["trials"]
    assert result["registry_uri"] == "models:/e2e-search-best@candidate", result
    assert trials["total"] == trials["finished"] == 2 and trials["best"]["value"] > 0, trials
    out = mlflow_script(service.tracking_uri, (
        "exp = c.get_experiment_by_name('e2e-search')\n"
        "runs = c.search_runs([exp.experiment_id])\n"
        "mv = c.get_model_version_by_alias('e2e-search-best', 'candidate')\n"
        "print(json.dumps({'runs': [[r.info.run_id, r.data.tags.get('mlflow.parentRunId'), r.info.status]\n"
        "                            for r in runs], 'version_run': mv.run_id}))\n"))
    seen = json.loads(out.strip().splitlines()[-1])
    [parent] = [r for r in seen["runs"] if r[1] is None]
    children = [r for r in seen["runs"] if r[1] == parent[0]]
    assert parent[0] == done["progress"]["mlflow_run_id"] and parent[2] == "FINISHED", seen
    assert len(children) == 2 and all(r[2] == "FINISHED" for r in children), seen
    assert seen["version_run"] == trials["best"]["mlflow_run_id"], (seen, trials)


@PRODUCTION_ONLY
def test_the_s3_secret_is_in_no_log_api_answer_or_mlflow_run(service):
    """After the module's production jobs: the secret the service, its head, drivers and workers all
    had in their environment is nowhere a user or another process reads."""
    assert service.env["AWS_SECRET_ACCESS_KEY"] == S3_SECRET
    jobs = service.get("/v1/jobs", params={"limit": 500})
    items = jobs.json()["items"]
    assert any(j["status"] == "succeeded" for j in items), "this test reads what the module's production jobs left"
    seen = {"serve.log": (service.data / "serve.log").read_text(errors="replace"), "GET /v1/jobs": jobs.text}
    for j in items:
        for path in (f"/v1/jobs/{j['id']}", f"/v1/jobs/{j['id']}/logs?tail=100000", f"/v1/jobs/{j['id']}/metrics"):
            seen[f"GET {path}"] = service.get(path).text
    models = service.get("/v1/models")
    seen["GET /v1/models"] = models.text
    for m in models.json()["items"]:
        seen[f"GET /v1/models/{m['name']}"] = service.get(f"/v1/models/{m['name']}").text
    seen["MLflow runs and model versions"] = mlflow_script(service.tracking_uri, (
        "out = []\n"
        "for exp in c.search_experiments():\n"
        "    for r in c.search_runs([exp.experiment_id], max_results=1000):\n"
        "        out.append([r.info.run_id, r.data.params, r.data.tags])\n"
        "for m in c.search_registered_models():\n"
        "    for v in c.search_model_versions(f\"name = '{m.name}'\"):\n"
        "        out.append([m.name, v.version, v.tags, v.source])\n"
        "print(json.dumps(out))\n"))
    assert len(json.loads(seen["MLflow runs and model versions"].strip().splitlines()[-1])) >= len(items)
    leaked = [where for where, text in seen.items() if S3_SECRET in text]
    assert not leaked, f"the S3 secret appears in: {leaked}"


def _raylet_addresses(head: int) -> set[str]:
    """The node addresses of the raylets in the process group of `ray start` pid `head` (Linux's /proc)."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            if not argv[0].endswith(b"/raylet") or os.getpgid(int(cmdline.parent.name)) != head:
                continue
        except OSError:
            continue
        found |= {a.split(b"=", 1)[1].decode() for a in argv if a.startswith(b"--node_ip_address=")}
    return found


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
    # Bound to the loopback address, as it says: not the machine's outward one, which Ray on Linux
    # takes for 127.0.0.1 unless told otherwise.
    assert _raylet_addresses(head) == {"127.0.0.1"}
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
