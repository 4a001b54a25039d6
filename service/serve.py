"""`leoclr serve`: the REST API over a Ray cluster, wired here (the service's side of the CLI).

Added to the `leoclr` command through the `leoclr.commands` entry point (pyproject.toml), so the
core's CLI never imports this package. Nothing it imports before uvicorn serves pulls in torch or
mlflow (tests/unit/test_service_imports.py): the API answers /healthz well within 2 s of its start.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from service.settings import ServiceSettings

console = Console(stderr=True)

DRIVER_MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def describe_backends(s: ServiceSettings, environ: Mapping[str, str] = os.environ) -> list[str]:
    """What `leoclr serve` says at start about where it keeps things: the job store, MLflow and the
    checkpoint storage (for s3://, the endpoint too), with passwords masked, and for an embedded
    default the variable that moves it out. Never a secret key: where, not with what."""
    from service.settings import masked_uri
    from service.store import shown

    storage = masked_uri(s.ray_storage)
    if not s.storage_path:
        storage += " (a local folder; LEOCLR_STORAGE_PATH moves it to shared storage, e.g. s3://bucket/prefix)"
    elif s.storage_path.startswith("s3://"):
        name = next((n for n in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if environ.get(n)), None)
        storage += f" at {masked_uri(environ[name])} ({name})" if name else " at AWS (AWS_ENDPOINT_URL unset)"
    embedded = " (SQLite, embedded; {} moves it to a server)"
    return [
        f"job store: {shown(s.job_database_url)}" + ("" if s.database_url else embedded.format("LEOCLR_DATABASE_URL")),
        f"MLflow: {masked_uri(s.tracking_uri)}" + ("" if s.mlflow_tracking_uri else embedded.format("MLFLOW_TRACKING_URI")),
        f"checkpoints: {storage}",
    ]


def _say(line: str) -> None:
    # No markup (a URL's [::1] is no style), and no wrapping: a line stays one line in a log.
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of the embedded Ray head (default: all)."),
) -> None:
    """Start the REST API (FastAPI + uvicorn) over the Ray cluster at LEOCLR_RAY_JOBS_ADDRESS or
    RAY_ADDRESS. Embedded defaults: a Ray head on 127.0.0.1 started (or found again) for it, and
    restarted if it dies; MLflow and the job store on SQLite under LEOCLR_DATA_DIR. A cluster that
    does not answer yet is no reason to stop: jobs wait `queued` and /readyz says 503 until it does."""
    import uvicorn

    from service.app import create_app
    from service.cluster import HeadSupervisor, ensure_head
    from service.runner import RayJobsRunner
    from service.settings import ServiceSettings, masked_uri

    s = ServiceSettings()
    for line in describe_backends(s):
        _say(line)
    supervisor = None
    # What every job's driver is told, so its runs, checkpoints and models land where the API looks.
    env = {"LEOCLR_DATA_DIR": str(s.home), "MLFLOW_TRACKING_URI": s.tracking_uri}
    if s.storage_path:
        env["LEOCLR_STORAGE_PATH"] = s.storage_path
    # MLflow's client retries a tracking server that is gone for many minutes by default (7 retries
    # with backoff, 120 s a request): a job whose server went away would look alive for that long.
    for name, value in DRIVER_MLFLOW_HTTP.items():
        env[name] = os.environ.get(name, value)
    if s.ray_jobs_address:
        runner = RayJobsRunner(s.ray_jobs_address, env=env)
        _say(f"Ray Jobs API: {masked_uri(s.ray_jobs_address)}")
    elif s.ray_address:
        from service.runner import dashboard_url

        ray_address = s.ray_address
        runner = RayJobsRunner(lambda: dashboard_url(ray_address), env=env)  # asked again until the cluster answers
        _say(f"Ray cluster {masked_uri(ray_address)} (its Jobs API is found on first use)")
    else:
        try:
            head = ensure_head(s.home, num_cpus)
        except RuntimeError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        leoclr = Path(sys.executable).with_name("leoclr")  # this install's CLI, whatever PATH the head has
        runner = RayJobsRunner(head.dashboard_url, entrypoint=f"{leoclr} run-job", env=env)
        supervisor = HeadSupervisor(s.home, head, lambda new: runner.retarget(new.dashboard_url), num_cpus,
                                    s.head_restarts)
        supervisor.start()
        console.print(f"Ray head: {head.gcs_address}, dashboard and Jobs API {head.dashboard_url}")
    try:
        uvicorn.run(create_app(s, runner), host=host, port=port, log_level="info")
    finally:
        if supervisor is not None:
            supervisor.stop()
            if supervisor.head.owned:
                supervisor.head.stop()


def register(app: typer.Typer) -> None:
    app.command()(serve)
