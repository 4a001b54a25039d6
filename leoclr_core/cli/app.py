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

from leoclr_core.spec.models import EvaluateSpec, PretrainSpec, SpecError, TuneSpec, load_spec, parse_spec

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
        from leoclr_core.training.pretrain import pretrain as run

        try:
            state = _run_with_progress(lambda cb: run(spec, device=device, callbacks=cb, out_dir=out))
        except (ValueError, FileNotFoundError, FloatingPointError) as exc:  # FloatingPointError: diverged
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


def _sigterm_interrupts() -> None:
    """SIGTERM (the service cancelling a Ray Job, a pod stopping) ends the run as Ctrl-C does, so its
    MLflow run is closed as KILLED rather than left RUNNING. Set after ray.init, whose own handler
    would otherwise only log the signal."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def _pretrain_on_ray(spec: PretrainSpec, out: Path) -> tuple[dict, dict]:
    from leoclr_core.distributed.pretrain import run_pretrain
    from leoclr_core.distributed.session import ray_session

    terminal = console.is_terminal or _force_progress()
    try:
        with ray_session(_cpus_needed(spec), log_to_driver=not terminal) as address:
            console.print(f"Ray: {address}")
            _sigterm_interrupts()
            run = _run_with_progress(lambda cb: run_pretrain(spec, callbacks=cb, out_dir=out))
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    except Exception as exc:  # noqa: BLE001 - Ray's errors carry the worker's traceback; say it, exit non-zero
        _fail(f"{type(exc).__name__}: {exc}")
    enc = run.encoder
    extra = {"mlflow_run_id": run.run_id, "storage": run.storage, "worker_nodes": run.worker_nodes,
             "restarts": run.restarts,
             "epochs_redone": run.epochs_redone, "resumed_from": run.resumed_from, "seconds": round(run.seconds, 1),
             "model_uri": enc.model_uri if enc else None, "registry_uri": enc.registry_uri if enc else None,
             "model_version": enc.version if enc else None, "already_finished": run.already_finished}
    if run.note:
        console.print(f"[yellow]{run.note}[/yellow]")
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
            from leoclr_core.evaluation.job import evaluate_job

            encoder = None
            if spec.encoder.model_uri:
                from leoclr_core.tracking import load_encoder

                encoder = load_encoder(spec.encoder.model_uri)
            result = evaluate_job(spec, device=device, encoder=encoder)
        else:
            from leoclr_core.distributed.evaluate import run_evaluate
            from leoclr_core.distributed.session import ray_session

            with ray_session(_cpus_needed(spec)):
                _sigterm_interrupts()
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


@app.command("tune")
def tune_cmd(
    spec_path: Path = typer.Argument(..., help="A tune job spec (YAML or JSON): a base pretrain spec and a search space."),
    overrides: Optional[list[str]] = SetOption,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Search folder (default: runs/<name>)."),
) -> None:
    """Search hyperparameters with Ray Tune (each trial a Ray Train run), rank the trials, and register
    the best trial's encoder. Run again with the same name to resume an interrupted search."""
    spec: TuneSpec = _load(spec_path, overrides, "tune")
    _tune(spec, output or spec.out_dir)


def _tune(spec: TuneSpec, out: Path) -> None:
    from leoclr_core.distributed.session import ray_session
    from leoclr_core.distributed.tune import run_tune

    console.print(f"[bold]{spec.name}[/bold]: {spec.num_samples} trial(s) of {', '.join(spec.space)}, "
                  f"{spec.max_concurrent_trials} at a time, {spec.scheduler.type} scheduler, ranked by {spec.metric} "
                  f"({spec.direction}) -> {out}")
    try:
        # Tune prints its own trial table; the trials' Ray Data progress lines would bury it.
        with ray_session(_cpus_needed(spec), log_to_driver=False) as address:
            console.print(f"Ray: {address}")
            _sigterm_interrupts()
            run = run_tune(spec, out_dir=out)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    except Exception as exc:  # noqa: BLE001 - say it, exit non-zero
        _fail(f"{type(exc).__name__}: {exc}")
    table = Table("rank", "trial", *spec.space, spec.metric, "epochs", "stopped early")
    for i, r in enumerate(run.table, 1):
        v = r.get(spec.metric)
        table.add_row(str(i), r["trial"], *(f"{r[p]:.4g}" if isinstance(r[p], float) else str(r[p]) for p in spec.space),
                      f"{v:.3f}" if isinstance(v, float) else "-", str(r["epochs"]), "yes" if r["stopped_early"] else "")
    console.print(table)
    if run.note:
        console.print(f"[yellow]{run.note}[/yellow]")
    console.print(f"MLflow parent run {run.run_id} (trials.csv, trials.png); {run.seconds:.0f} s; "
                  f"{run.stopped_early} trial(s) stopped early")
    enc = run.encoder
    if enc is not None and enc.registry_uri:
        console.print(f"best trial {run.best['trial']}: registered [bold]{enc.registry_uri}[/bold] (version {enc.version})")
    elif enc is not None and enc.version:  # a finished search's version, whose alias has moved on since
        console.print(f"best trial {run.best['trial']}: registered as models:/{enc.name}/{enc.version}")
    elif run.best is None:
        console.print("[yellow]no trial finished all its epochs with a metric: nothing registered[/yellow]")
    best = run.best or {}
    typer.echo(json.dumps({
        "name": spec.name, "out_dir": str(out), "mlflow_run_id": run.run_id, "seconds": round(run.seconds, 1),
        "trials": len(run.table), "stopped_early": run.stopped_early, "best_trial": best.get("trial"),
        f"best_{spec.metric}": best.get(spec.metric), spec.metric: best.get(spec.metric),
        "registry_uri": enc.registry_uri if enc else None, "model_version": enc.version if enc else None,
        "already_finished": run.already_finished, "storage": run.storage, "table": run.table}, default=str))


# ---------------------------------------------------------------- client of the REST API
def _api(fn):
    """Run fn(client); an API error (refused, unreachable, no token) is one red line and exit 1."""
    from service.client import ApiClient, ApiError

    try:
        return fn(ApiClient())
    except ApiError as exc:
        _fail(exc)


class JobView:
    """A service job as it runs: a progress bar on a terminal, a line per epoch elsewhere."""

    def __init__(self) -> None:
        self.terminal = console.is_terminal or _force_progress()
        self.progress = make_progress() if self.terminal else None
        self.task, self.status, self.epoch = None, None, None

    def __enter__(self) -> "JobView":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, job: dict) -> None:
        if job["status"] != self.status:
            self.status = job["status"]
            console.print(f"job {job['id']}: {self.status}")
        p = job.get("progress") or {}
        trials = p.get("trials")
        if trials is not None:  # a search: one line each time its trials move
            best = trials.get("best") or {}
            line = (f"trials: {trials['finished']} finished, {trials['running']} running, "
                    f"{trials['stopped_early']} stopped early, {trials['failed']} failed"
                    + (f"; best so far {best['trial']} {best['metric']} {best['value']:.3f}" if best else ""))
            if line != self.epoch:
                self.epoch = line
                console.print(line)
            return
        if not p.get("total_steps"):
            return
        fields = {"epoch": f"{p.get('epoch') or 0}/{p.get('epochs')}",
                  "loss": f"{p['loss']:.3f}" if p.get("loss") is not None else "-",
                  "ips": f"{p['instances_per_s']:.0f}" if p.get("instances_per_s") else "-",
                  "knn": f"{p['knn_top1']:.1f}" if p.get("knn_top1") is not None else "-"}
        if self.progress is not None:
            if self.task is None:
                self.task = self.progress.add_task("job", total=p["total_steps"], **fields)
            self.progress.update(self.task, completed=p.get("step") or 0, **fields)
        elif p.get("epoch") != self.epoch:
            self.epoch = p.get("epoch")
            eta = f"  ETA {p['eta_seconds']:.0f} s" if p.get("eta_seconds") is not None else ""
            console.print(f"epoch {fields['epoch']}  step {p.get('step')}/{p['total_steps']}  loss {fields['loss']}  "
                          f"{fields['ips']} inst/s  k-NN {fields['knn']}{eta}")


def _follow(client: Any, job: dict) -> dict:
    """Follow a job to its end; Ctrl-C cancels it over REST and exits 130.

    Ctrl-C also sets a flag that every poll checks. Python drops a KeyboardInterrupt that lands
    while a finaliser (a `__del__`, a weakref callback) runs, and a Ctrl-C lost that way would leave
    `make run` following a job it was asked to stop."""
    import signal
    import threading

    interrupted = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Python's own handler stays
        previous = None
    try:
        with JobView() as view:
            def update(current: dict) -> None:
                if interrupted.is_set():
                    raise KeyboardInterrupt
                view.update(current)

            return client.wait(job["id"], on_update=update)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted: cancelling job {job['id']}[/yellow]")
        try:
            client.cancel(job["id"])
        except Exception as exc:  # noqa: BLE001 - already finished, or the API went away
            console.print(f"cancel: {exc}")
        raise typer.Exit(130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _report(job: dict) -> None:
    result, p = job.get("result") or {}, job.get("progress") or {}
    if job["status"] != "succeeded":
        console.print(f"[red]job {job['id']} {job['status']}[/red]" + (f":\n{job['error']}" if job.get("error") else ""))
        typer.echo(json.dumps({"id": job["id"], "status": job["status"]}))
        raise typer.Exit(1)
    knn = result.get("knn_top1", p.get("knn_top1"))
    if job["kind"] == "pretrain":
        console.print(f"final k-NN top-1: [bold]{knn:.2f}%[/bold]" if knn is not None else "final k-NN top-1: n/a")
    if job["kind"] == "tune" and result.get("best_trial"):
        metric = job["spec"].get("metric", "knn_top1")
        console.print(f"best trial {result['best_trial']}: {metric} [bold]{result.get(metric):.3f}[/bold] of "
                      f"{result.get('trials')} trials ({result.get('stopped_early')} stopped early)")
    if result.get("registry_uri"):
        console.print(f"registered: [bold]{result['registry_uri']}[/bold] (version {result.get('model_version')}); "
                      f"load with mlflow.pytorch.load_model(\"{result['registry_uri']}\")")
    if p.get("mlflow_run_url"):
        console.print(f"MLflow run: {p['mlflow_run_url']}")
    typer.echo(json.dumps({"id": job["id"], "status": job["status"], **result}))


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
        _fail(exc, code=2)
    body = spec.model_dump(mode="json")

    def go(client: Any) -> None:
        job = client.submit(body, idempotency_key)
        console.print(f"submitted job [bold]{job['id']}[/bold] ({spec.kind} '{spec.name}') to {client.url}")
        if follow or serve_:
            _report(_follow(client, job))
        else:
            typer.echo(job["id"])

    if not serve_:
        return _api(go)
    import os

    from service.client import ApiError
    from service.embedded import embedded_service

    cpus = max(os.cpu_count() or 1, int(-(-_cpus_needed(spec) // 1)))  # sized for the job, as a local Ray is
    console.print("starting the service (embedded Ray head, MLflow and job store under LEOCLR_DATA_DIR) ...")
    try:
        with embedded_service(cpus) as client:
            console.print(f"service at {client.url}")
            go(client)
    except typer.Exit:  # click's Exit is a RuntimeError: let it through with its code
        raise
    except (ApiError, RuntimeError) as exc:
        _fail(exc)


def _cpus_needed(spec: Any) -> float:
    """Logical CPUs a job asks of Ray (its workers, data tasks; a search: its concurrent trials)."""
    from leoclr_core.spec.resources import job_resources

    return job_resources(spec)["CPU"]


@app.command()
def status(job_id: Optional[str] = typer.Argument(None, help="A job id; none: list the latest jobs."),
           follow: bool = typer.Option(False, "--follow", "-f", help="Follow the job to its end.")) -> None:
    """A job's status and progress (JSON), or a table of the latest jobs."""
    def go(client: Any) -> None:
        if job_id is None:
            table = Table("id", "kind", "name", "status", "created")
            for j in client.jobs()["items"]:
                table.add_row(j["id"], j["kind"], j["name"], j["status"], j["created_at"][:19])
            console.print(table)
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
    def go(client: Any) -> None:
        table = Table("model", "version", "aliases", "k-NN top-1", "job", "load with")
        for m in client.models():
            for v in m["versions"]:
                knn = v["metrics"].get("knn_top1")
                table.add_row(m["name"], v["version"], ",".join(v["aliases"]), f"{knn:.2f}" if knn is not None else "",
                              v.get("job_id") or "", f"models:/{m['name']}@{v['aliases'][0]}" if v["aliases"] else v["uri"])
        console.print(table)
    _api(go)


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
    import os

    from leoclr_core.contract import ENV_JOB_SPEC

    raw = os.environ.get(ENV_JOB_SPEC)
    if not raw:
        _fail(f"{ENV_JOB_SPEC} is not set: it must hold the job spec as JSON", code=2)
    try:
        spec = parse_spec(json.loads(raw))  # type: ignore[arg-type]
    except (json.JSONDecodeError, SpecError) as exc:
        _fail(f"{ENV_JOB_SPEC}: {exc}", code=2)
    from leoclr_core.settings import core_settings

    if not spec.output_dir:  # a job's driver runs in a Ray-chosen folder: keep the run with the data
        spec = spec.model_copy(update={"output_dir": str(core_settings().home / "runs" / spec.name)})
    if spec.kind == "pretrain":
        _pretrain(spec, spec.out_dir)
    elif spec.kind == "tune":
        _tune(spec, spec.out_dir)
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
    from leoclr_core.studies.crop_semantics import run_crop_semantics

    try:
        run_crop_semantics(output, quick=quick, device=device, epochs=epochs, only=variants,
                           methods=methods, overrides=overrides or [], console=console)
    except (SpecError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


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
