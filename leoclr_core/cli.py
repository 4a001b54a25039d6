"""`leoclr`: run pretraining, evaluation and the crop-semantics experiment from the command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .spec import EvaluateSpec, PretrainSpec, SpecError, load_spec, parse_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LeOCLR self-supervised pretraining.")
experiment_app = typer.Typer(no_args_is_help=True, help="Experiments that test the method's claims.")
app.add_typer(experiment_app, name="experiment")
console = Console(stderr=True)

SetOption = typer.Option(None, "--set", "-s", help="Override a spec field: section.field=value (repeatable).")


def _load(path: Path, overrides: Optional[list[str]], kind: str) -> Any:
    try:
        spec = load_spec(path, overrides or [])
    except SpecError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if spec.kind != kind:
        console.print(f"[red]error:[/red] {path} is a '{spec.kind}' spec; this command runs '{kind}' specs")
        raise typer.Exit(2)
    return spec


class ProgressCallbacks:
    """A rich progress bar over all steps of the run: epoch, step, instances/s, loss, ETA."""

    def __init__(self, progress: Progress):
        self.progress, self.task = progress, None

    def on_start(self, state) -> None:
        total = state.epochs * state.steps_per_epoch
        done = state.start_epoch * state.steps_per_epoch
        self.steps_per_epoch = state.steps_per_epoch
        self.task = self.progress.add_task(
            "pretrain", total=total, completed=done, epoch=f"{state.start_epoch}/{state.epochs}",
            loss="-", ips="-", knn="-",
        )
        self.epochs = state.epochs

    def on_log(self, record: dict) -> None:
        self.progress.update(
            self.task, completed=record["step"], epoch=f"{record['epoch']}/{self.epochs}",
            loss=f"{record['loss']:.3f}", ips=f"{record['instances_per_s']:.0f}",
        )

    def on_epoch(self, record: dict, state) -> None:
        fields = {"completed": record["step"], "epoch": f"{record['epoch']}/{self.epochs}",
                  "loss": f"{record['loss']:.3f}", "ips": f"{record['instances_per_s']:.0f}"}
        if "knn_top1" in record:
            fields["knn"] = f"{record['knn_top1']:.1f}"
        self.progress.update(self.task, **fields)

    def on_checkpoint(self, path: Path, epoch: int) -> None: ...


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("{task.fields[ips]} inst/s"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("k-NN {task.fields[knn]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal and not _force_progress(),
    )


def _force_progress() -> bool:
    import os

    return os.environ.get("LEOCLR_PROGRESS") == "1"


class LineCallbacks:
    """Plain log lines for non-terminals (CI, files): one line per epoch."""

    def on_start(self, state) -> None:
        console.print(f"training {state.epochs} epochs x {state.steps_per_epoch} steps, from epoch {state.start_epoch}")

    def on_log(self, record: dict) -> None: ...

    def on_epoch(self, record: dict, state) -> None:
        knn = f"  k-NN {record['knn_top1']:.2f}%" if "knn_top1" in record else ""
        console.print(
            f"epoch {record['epoch']}/{state.epochs}  step {record['step']}  loss {record['loss']:.4f}  "
            f"{record['instances_per_s']:.0f} inst/s  lr {record['lr']:.4f}{knn}"
        )

    def on_checkpoint(self, path: Path, epoch: int) -> None: ...


LocalOption = typer.Option(
    False, "--local", help="Run in this process without Ray or MLflow (outputs only in the run folder).")


def _run_with_progress(fn):
    """Call fn(callbacks) under a progress bar on a terminal, with one line per epoch elsewhere."""
    if console.is_terminal or _force_progress():
        with make_progress() as progress:
            return fn(ProgressCallbacks(progress))
    return fn(LineCallbacks())


def _fail(exc: BaseException, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(code) from None


@app.command()
def pretrain(
    spec_path: Path = typer.Argument(..., help="A pretrain job spec (YAML or JSON)."),
    overrides: Optional[list[str]] = SetOption,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (default: runs/<name>)."),
    device: Optional[str] = typer.Option(None, help="Torch device for --local, e.g. cpu or cuda:0."),
    local: bool = LocalOption,
) -> None:
    """Pretrain an encoder with LeOCLR (or the MoCo-v2 baseline).

    On Ray: the cluster at RAY_ADDRESS, or a local Ray started for this run and stopped after;
    tracked in MLflow (MLFLOW_TRACKING_URI, default SQLite under LEOCLR_DATA_DIR) and, with a
    `register` section, registered as models:/<model_name>@<alias>.
    """
    spec: PretrainSpec = _load(spec_path, overrides, "pretrain")
    _pretrain(spec, output or spec.out_dir, local=local, device=device)


def _pretrain(spec: PretrainSpec, out: Path, local: bool = False, device: Optional[str] = None) -> None:
    where = "in this process" if local else f"on Ray, {spec.scaling.num_workers} worker(s)"
    console.print(f"[bold]{spec.name}[/bold]: {spec.method} on {spec.data.source}, backbone {spec.model.backbone}, "
                  f"{spec.optim.epochs} epochs, {where} -> {out}")
    extra: dict[str, Any] = {}
    if local:
        from .train import pretrain as run

        try:
            state = _run_with_progress(lambda cb: run(spec, device=device, callbacks=cb, out_dir=out))
        except (ValueError, FileNotFoundError) as exc:
            _fail(exc)
        final = state.final
    else:
        final, extra = _pretrain_on_ray(spec, out)
    knn = f"{final['knn_top1']:.2f}%" if "knn_top1" in final else "n/a (no labelled test split)"
    console.print(f"final k-NN top-1 (offline, k={spec.eval.knn_k}, backbone features): [bold]{knn}[/bold]")
    console.print(f"encoder: {out / 'encoder.pt'}   metrics: {out / 'metrics.jsonl'}")
    if extra.get("registry_uri"):
        console.print(f"registered: [bold]{extra['registry_uri']}[/bold] (version {extra['model_version']}); "
                      f"load with mlflow.pytorch.load_model(\"{extra['registry_uri']}\")")
    typer.echo(json.dumps({"name": spec.name, "out_dir": str(out), **extra,
                           **{k: v for k, v in final.items() if k != 'type'}}))


def _pretrain_on_ray(spec: PretrainSpec, out: Path) -> tuple[dict, dict]:
    from .distributed.pretrain import cluster_cpus_needed, run_pretrain
    from .distributed.session import ray_session

    terminal = console.is_terminal or _force_progress()
    try:
        with ray_session(cluster_cpus_needed(spec), log_to_driver=not terminal) as address:
            console.print(f"Ray: {address}")
            run = _run_with_progress(lambda cb: run_pretrain(spec, callbacks=cb, out_dir=out))
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    except Exception as exc:  # noqa: BLE001 - Ray's errors carry the worker's traceback; say it, exit non-zero
        _fail(f"{type(exc).__name__}: {exc}")
    enc = run.encoder
    extra = {"mlflow_run_id": run.run_id, "storage": run.storage, "restarts": run.restarts,
             "epochs_redone": run.epochs_redone, "resumed_from": run.resumed_from, "seconds": round(run.seconds, 1),
             "model_uri": enc.model_uri if enc else None, "registry_uri": enc.registry_uri if enc else None,
             "model_version": enc.version if enc else None}
    console.print(f"MLflow run {run.run_id}; checkpoints in {run.storage}; {run.seconds:.0f} s"
                  + (f"; survived {run.restarts} restart(s), {run.epochs_redone} epoch(s) redone" if run.restarts else ""))
    return run.state.final, extra


@app.command()
def evaluate(
    spec_path: Path = typer.Argument(..., help="An evaluate job spec (YAML or JSON)."),
    overrides: Optional[list[str]] = SetOption,
    device: Optional[str] = typer.Option(None, help="Torch device for --local (default: cuda if the spec uses GPUs)."),
    local: bool = LocalOption,
) -> None:
    """Evaluate a frozen encoder (registry URI, run URI or checkpoint): k-NN, linear probe or transfer."""
    spec: EvaluateSpec = _load(spec_path, overrides, "evaluate")
    _evaluate(spec, local=local, device=device)


def _evaluate(spec: EvaluateSpec, local: bool = False, device: Optional[str] = None) -> None:
    try:
        if local:
            from .run_eval import evaluate_job

            encoder = None
            if spec.encoder.model_uri:
                from .tracking import load_encoder

                encoder = load_encoder(spec.encoder.model_uri)
            result = evaluate_job(spec, device=device, encoder=encoder)
        else:
            from .distributed.evaluate import run_evaluate
            from .distributed.session import ray_session

            with ray_session(spec.scaling.cpus_per_worker):
                result = run_evaluate(spec)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    except Exception as exc:  # noqa: BLE001 - a Ray task error wraps the real one; say it, exit non-zero
        cause = getattr(exc, "cause", None)
        _fail(cause if isinstance(cause, (ValueError, FileNotFoundError)) else f"{type(exc).__name__}: {exc}")
    table = Table("protocol", "top-1 %")
    for k, v in result.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.2f}")
    console.print(table)
    typer.echo(json.dumps(result))


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of the embedded Ray head (default: all)."),
) -> None:
    """Start the REST API (FastAPI + uvicorn). Embedded defaults: a Ray head on 127.0.0.1 started
    (or found again) for it, MLflow and the job store on SQLite under LEOCLR_DATA_DIR."""
    import sys

    import uvicorn

    from service.app import create_app
    from service.cluster import ensure_head
    from service.runner import RayJobsRunner
    from service.settings import ServiceSettings

    s = ServiceSettings()
    head = None
    env = {"LEOCLR_DATA_DIR": str(s.home), "MLFLOW_TRACKING_URI": s.tracking_uri}
    if s.ray_jobs_address:
        runner = RayJobsRunner(s.ray_jobs_address, env=env)
    else:
        head = ensure_head(s.home, num_cpus)
        leoclr = Path(sys.executable).with_name("leoclr")  # this install's CLI, whatever PATH the head has
        runner = RayJobsRunner(head.dashboard_url, entrypoint=f"{leoclr} run-job", env=env)
        console.print(f"Ray head: {head.gcs_address}, dashboard and Jobs API {head.dashboard_url}")
    try:
        uvicorn.run(create_app(s, runner), host=host, port=port, log_level="info")
    finally:
        if head is not None and head.owned:
            head.stop()


@app.command("run-job")
def run_job() -> None:
    """Run the job spec in $LEOCLR_JOB_SPEC (JSON) on the Ray cluster this process is in.

    The entrypoint of the service's Ray Jobs: the spec travels in the job's environment, so the
    driver needs no file shared with the API.
    """
    import os

    raw = os.environ.get("LEOCLR_JOB_SPEC")
    if not raw:
        _fail("LEOCLR_JOB_SPEC is not set: it must hold the job spec as JSON", code=2)
    try:
        spec = parse_spec(json.loads(raw))  # type: ignore[arg-type]
    except (json.JSONDecodeError, SpecError) as exc:
        _fail(f"LEOCLR_JOB_SPEC: {exc}", code=2)
    from .settings import core_settings

    if not spec.output_dir:  # a job's driver runs in a Ray-chosen folder: keep the run with the data
        spec = spec.model_copy(update={"output_dir": str(core_settings().home / "runs" / spec.name)})
    if spec.kind == "pretrain":
        _pretrain(spec, spec.out_dir)
    else:
        _evaluate(spec)


@experiment_app.command("crop-semantics")
def crop_semantics(
    quick: bool = typer.Option(False, "--quick", help="A seconds-long version (for tests); numbers are not meaningful."),
    output: Path = typer.Option(Path("runs/crop-semantics"), "--output", "-o"),
    device: Optional[str] = typer.Option(None, help="Torch device (default: cuda if available, else cpu)."),
    epochs: Optional[int] = typer.Option(None, help="Override the epochs of every run."),
    variants: Optional[list[str]] = typer.Option(None, "--variant", help="Run only these variants (repeatable)."),
    methods: Optional[list[str]] = typer.Option(
        None, "--method", help="Methods to compare (repeatable): LeOCLR, MoCo-v2, LeOCLR-sym, MoCo-v2-sym."
    ),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Train LeOCLR and MoCo-v2 with the same seed, data, epochs and backbone; table + plot."""
    from .experiment import run_crop_semantics

    try:
        run_crop_semantics(output, quick=quick, device=device, epochs=epochs, only=variants,
                           methods=methods, overrides=overrides or [], console=console)
    except (SpecError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
