"""`leoclr`: run pretraining, evaluation and the crop-semantics experiment from the command line,
and submit jobs to the REST API. Commands parse their options and call out: the jobs this process
runs are in `jobs`, the REST client in `client`, what is shown in `display`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from leoclr_core.cli import client as api
from leoclr_core.cli import display, jobs
from leoclr_core.cli.display import console, fail
from leoclr_core.spec.models import SpecError, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LeOCLR self-supervised pretraining.")
experiment_app = typer.Typer(no_args_is_help=True, help="Experiments that test the method's claims.")
app.add_typer(experiment_app, name="experiment")

SetOption = typer.Option(None, "--set", "-s", help="Override a spec field: section.field=value (repeatable).")
LocalOption = typer.Option(
    False, "--local", help="Run in this process without Ray or MLflow (outputs only in the run folder).")


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
    spec = jobs.load(spec_path, overrides, "pretrain")
    jobs.pretrain(spec, output or spec.out_dir, local=local, device=device)


@app.command()
def evaluate(
    spec_path: Path = typer.Argument(..., help="An evaluate job spec (YAML or JSON)."),
    overrides: Optional[list[str]] = SetOption,
    device: Optional[str] = typer.Option(None, help="Torch device for --local (default: cuda if the spec uses GPUs)."),
    local: bool = LocalOption,
) -> None:
    """Evaluate an encoder (registry URI, run URI or checkpoint): k-NN, linear probe or transfer of its
    frozen features, or a fine-tune of a copy on a fraction of the labels."""
    jobs.evaluate(jobs.load(spec_path, overrides, "evaluate"), local=local, device=device)


@app.command("tune")
def tune_cmd(
    spec_path: Path = typer.Argument(..., help="A tune job spec (YAML or JSON): a base pretrain spec and a search space."),
    overrides: Optional[list[str]] = SetOption,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Search folder (default: runs/<name>)."),
) -> None:
    """Search hyperparameters with Ray Tune (each trial a Ray Train run), rank the trials, and register
    the best trial's encoder. Run again with the same name to resume an interrupted search."""
    spec = jobs.load(spec_path, overrides, "tune")
    jobs.tune(spec, output or spec.out_dir)


@app.command("neighbours")
def neighbours_cmd(
    embeddings: str = typer.Argument(..., help="An embed job's output: a folder of Parquet files (or a URI)."),
    queries: list[str] = typer.Option(
        ..., "--query", "-q", help="A row id of EMBEDDINGS (row-12, or an image path relative to the data "
        "root) or an image file, embedded with the encoder the files name (repeatable: one row each)."),
    k: int = typer.Option(8, "-k", min=1, max=64, help="Neighbours per query."),
    output: Path = typer.Option(Path("neighbours.png"), "--output", "-o", help="The contact sheet (PNG)."),
) -> None:
    """A contact sheet: each query and its k nearest images (cosine) in an embed job's output, with
    class names (or ids) and scores; a neighbour of the query's class in green, of another in red."""
    from leoclr_core.evaluation.neighbours import sheet_for

    def load_registered(uri: str) -> Any:
        from leoclr_core.tracking import load_encoder

        return load_encoder(uri)

    try:
        out = sheet_for(embeddings, queries, k, output, load_registered=load_registered)
    except (ValueError, FileNotFoundError) as exc:
        fail(exc, code=2)
    console.print(f"contact sheet: {out}")


@app.command()
def embed(
    spec_path: Path = typer.Argument(..., help="An embed job spec (YAML or JSON): an encoder and a data source."),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """Embed a collection with an encoder (registry URI, run URI or checkpoint) on Ray Data: a Parquet
    dataset, one row per image (id, label, embedding), at output_dir (default
    <storage path>/embeddings/<name>); a re-run of the same job replaces it."""
    jobs.embed(jobs.load(spec_path, overrides, "embed"))


# ---------------------------------------------------------------- client of the REST API
def _api(fn: Callable[[api.ApiClient], Any]) -> Any:
    """Run fn(client); an API error (refused, unreachable, no token) is one red line and exit 1."""
    try:
        return fn(api.ApiClient())  # looked up at call time: tests point it at an in-process app
    except api.ApiError as exc:
        fail(exc)


def _follow(client: Any, job: dict) -> dict:
    """Follow a job to its end, shown as it runs; Ctrl-C cancels it over REST and exits 130."""
    try:
        with display.JobView() as view:
            return api.follow(client, job["id"], view.update)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted: cancelling job {job['id']}[/yellow]")
        try:
            client.cancel(job["id"])
        except Exception as exc:  # noqa: BLE001 - already finished, or the API went away
            console.print(f"cancel: {exc}")
        raise typer.Exit(130) from None


@app.command()
def submit(
    spec_path: Path = typer.Argument(..., help="A job spec (YAML or JSON): pretrain, evaluate or tune."),
    overrides: Optional[list[str]] = SetOption,
    follow: bool = typer.Option(False, "--follow", "-f", help="Follow the job to its end (Ctrl-C cancels it)."),
    serve_: bool = typer.Option(
        False, "--serve", help="Start the service on embedded defaults for this job and stop it after (implies --follow)."),
    idempotency_key: Optional[str] = typer.Option(None, help="Submitting again with the same key returns the same job."),
) -> None:
    """Submit a job to the REST API (LEOCLR_API_URL); print its id, or follow it with --follow."""
    try:
        spec = load_spec(spec_path, overrides or [])
    except SpecError as exc:
        fail(exc, code=2)
    body = spec.model_dump(mode="json")

    def go(client: Any) -> None:
        job = client.submit(body, idempotency_key)
        console.print(f"submitted job [bold]{job['id']}[/bold] ({spec.kind} '{spec.name}') to {client.url}")
        if follow or serve_:
            display.job_report(_follow(client, job))
        else:
            typer.echo(job["id"])

    if not serve_:
        return _api(go)
    import os

    from leoclr_core.cli.embedded import embedded_service

    cpus = max(os.cpu_count() or 1, int(-(-jobs.cpus_needed(spec) // 1)))  # sized for the job, as a local Ray is
    console.print("starting the service (embedded Ray head, MLflow and job store under LEOCLR_DATA_DIR) ...")
    try:
        with embedded_service(cpus) as client:
            console.print(f"service at {client.url}")
            go(client)
    except typer.Exit:  # click's Exit is a RuntimeError: let it through with its code
        raise
    except (api.ApiError, RuntimeError) as exc:
        fail(exc)


@app.command()
def status(job_id: Optional[str] = typer.Argument(None, help="A job id; none: list the latest jobs."),
           follow: bool = typer.Option(False, "--follow", "-f", help="Follow the job to its end.")) -> None:
    """A job's status and progress (JSON), or a table of the latest jobs."""
    def go(client: Any) -> None:
        if job_id is None:
            display.jobs_table(client.jobs()["items"])
            return
        job = _follow(client, client.job(job_id)) if follow else client.job(job_id)
        typer.echo(json.dumps(job, indent=2))
    _api(go)


@app.command()
def logs(job_id: str = typer.Argument(..., help="A job id."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Stream the log until the job ends."),
         tail: int = typer.Option(200, help="Lines from the end (without --follow).")) -> None:
    """The job driver's log (Ray Job logs)."""
    def go(client: Any) -> None:
        if follow:
            for chunk in client.follow_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(client.logs(job_id, tail))
    _api(go)


@app.command()
def cancel(job_id: str = typer.Argument(..., help="A job id.")) -> None:
    """Cancel a queued or running job (its Ray job is stopped)."""
    _api(lambda client: console.print(f"job {job_id}: {client.cancel(job_id)['status']}"))


@app.command()
def models() -> None:
    """Registered encoders: versions, aliases and the metrics of the job that made each."""
    _api(lambda client: display.models_table(client.models()))


@app.command()
def alias(name: str = typer.Argument(..., help="A registered model."),
          alias_: str = typer.Argument(..., metavar="ALIAS", help="The alias to set or move, e.g. champion."),
          version: str = typer.Argument(..., help="The version it should point at.")) -> None:
    """Point an alias of a registered model at a version (e.g. promote a candidate to champion)."""
    _api(lambda client: console.print(f"{name}: aliases {client.set_alias(name, alias_, version)['aliases']}"))


@app.command("run-job")
def run_job() -> None:
    """Run the job spec in $LEOCLR_JOB_SPEC (JSON) on the Ray cluster this process is in.

    The entrypoint of the service's Ray Jobs: the spec travels in the job's environment, so the
    driver needs no file shared with the API.
    """
    jobs.run_job()


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
    from leoclr_core.studies.crop_semantics import run_crop_semantics

    try:
        run_crop_semantics(output, quick=quick, device=device, epochs=epochs, only=variants,
                           methods=methods, overrides=overrides or [], console=console)
    except (SpecError, ValueError) as exc:
        fail(exc, code=2)


@experiment_app.command("method-study")
def method_study(
    quick: bool = typer.Option(False, "--quick", help="A seconds-long version (for tests); numbers are not meaningful."),
    scale: str = typer.Option("tiny", "--scale", help="tiny (the CPU study) or resnet18 (the same study on a GPU)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per cell (default 3; --quick 2)."),
    output: Optional[Path] = typer.Option(None, "--out", "--output", "-o",
                                          help="Study folder (default runs/method-study-<scale>)."),
    axes: Optional[list[str]] = typer.Option(None, "--axis", help="Sweep only these axes (repeatable): "
                                             "tiny width, epochs, view; resnet18 depth, epochs, view."),
    controls: str = typer.Option("base", "--controls", help="Where the control arms run: base, all or none."),
    device: Optional[str] = typer.Option(None, help="Torch device (default: cuda if available, else cpu)."),
    report_only: bool = typer.Option(False, "--report-only", help="Only recompute the outputs from records.jsonl."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs still to do and stop."),
    overrides: Optional[list[str]] = SetOption,
) -> None:
    """LeOCLR against MoCo-v2 over seeds, a sweep of capacity, epochs and view size, and controls that
    separate the hypotheses (docs/method-study.md). Resumable: a re-run skips the recorded runs.

    The default tiny study (3 seeds, 81 runs, 1,200 epochs) took 37 minutes on a 2-core CPU;
    --scale resnet18 runs the same study at ResNet scale on one GPU (estimated 1.5 hours on an
    H200, not measured). --dry-run prints the estimate of what is left."""
    from leoclr_core.studies.method_study import run_study

    try:
        run_study(output or Path(f"runs/method-study-{scale}"), scale=scale, quick=quick, seeds=seeds, axes=axes,
                  controls=controls, overrides=overrides or [], device=device, report_only=report_only,
                  dry_run=dry_run, console=console)
    except (SpecError, ValueError) as exc:
        fail(exc, code=2)


def _add_plugin_commands() -> None:
    """Commands other installed packages add (the service adds `serve`): found through the
    `leoclr.commands` entry points, so this package never imports them."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="leoclr.commands"):
        ep.load()(app)


_add_plugin_commands()


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
