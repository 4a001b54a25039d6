"""The API process starts small: neither torch nor mlflow (with pandas, pyarrow and scipy behind it,
seconds of start-up) is imported until a route needs MLflow, so `leoclr serve` answers its probes
soon after it starts. Each check runs in a fresh interpreter: this one has imported both already."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ("torch", "torchvision", "mlflow")

APP_UP = """
import json, sys
from fastapi.testclient import TestClient
import service.app
from service.app import create_app
from service.settings import ServiceSettings

seen = {"import": [m for m in HEAVY if m in sys.modules]}
app = create_app(ServiceSettings(data_dir=sys.argv[1], api_token="t"))
seen["create_app"] = [m for m in HEAVY if m in sys.modules]
with TestClient(app) as c:  # the lifespan: store, token, reconcile state
    assert c.get("/healthz").status_code == 200
    assert c.get("/v1/jobs", headers={"Authorization": "Bearer t"}).status_code == 200
    seen["serving"] = [m for m in HEAVY if m in sys.modules]
    c.get("/v1/models", headers={"Authorization": "Bearer t"})
    seen["after a models read"] = [m for m in HEAVY if m in sys.modules]
print(json.dumps(seen))
"""

SERVE = """
import json, sys, uvicorn

def run(app, **kw):  # where `leoclr serve` hands the app to uvicorn
    print(json.dumps([m for m in HEAVY if m in sys.modules]))

uvicorn.run = run
sys.argv = ["leoclr", "serve"]
from leoclr_core.cli.app import app
app()
"""


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{code}", *args], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_the_api_process_imports_neither_torch_nor_mlflow_until_a_route_needs_mlflow(tmp_path):
    seen = json.loads(_python(APP_UP, str(tmp_path)))
    assert seen["import"] == seen["create_app"] == seen["serving"] == [], seen
    assert seen["after a models read"] == ["mlflow"], seen  # on first use, and never torch


def test_leoclr_serve_reaches_uvicorn_without_torch_or_mlflow(tmp_path):
    env = {**os.environ, "LEOCLR_DATA_DIR": str(tmp_path), "LEOCLR_API_TOKEN": "t",
           "LEOCLR_RAY_JOBS_ADDRESS": "http://127.0.0.1:9"}  # a cluster given: no embedded head to start
    assert json.loads(_python(SERVE, env=env)) == []


BOTH_AT_ONCE = """
import sys, threading
from service.runner import RayJobsRunner
from service.tracking import LazyTracking

errors = []
def ray_first_use():
    try:
        RayJobsRunner("http://127.0.0.1:9").ping()  # imports Ray's Jobs client; nothing listens there
    except Exception as exc:
        if "partially initialized" in str(exc) or isinstance(exc, (ImportError, AttributeError)):
            errors.append(f"ray: {exc!r}")
def mlflow_first_use():
    try:
        LazyTracking("sqlite:///" + sys.argv[1] + "/mlflow.db")()
    except Exception as exc:
        errors.append(f"mlflow: {exc!r}")
threads = [threading.Thread(target=ray_first_use), threading.Thread(target=mlflow_first_use)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
"""


def test_the_first_uses_of_ray_and_mlflow_from_two_threads_at_once_both_work(tmp_path):
    # The reconcile loop's first ping of Ray and a first MLflow read at the same moment: two threads
    # importing both packages at once once left Ray's client half-imported for the life of the process
    # (every job stayed queued). A fresh interpreter, as the service starts.
    env = {**os.environ, "LEOCLR_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", BOTH_AT_ONCE, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
