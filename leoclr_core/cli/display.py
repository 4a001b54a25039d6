"""What `leoclr` shows: progress (a bar on a terminal, a line per epoch elsewhere), tables and reports.

Human-readable output goes to stderr (the console); each command's last stdout line is its result
as JSON, the one line scripts read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from leoclr_core.training.callbacks import Callbacks

console = Console(stderr=True)
T = TypeVar("T")


def fail(exc: BaseException | str, code: int = 1) -> NoReturn:
    """One red line and exit `code`: what a user sees instead of a traceback."""
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(code) from None


def print_result(result: dict[str, Any]) -> None:
    typer.echo(json.dumps(result, default=str))


def live() -> bool:
    """A progress bar (a terminal, or LEOCLR_PROGRESS=1), else plain lines."""
    return console.is_terminal or os.environ.get("LEOCLR_PROGRESS") == "1"


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
        disable=not live(),
    )


class ProgressCallbacks(Callbacks):
    """A rich progress bar over all steps of the run: epoch, step, instances/s, loss, ETA."""

    def __init__(self, progress: Progress):
        self.progress, self.task = progress, None

    def on_start(self, state) -> None:
        total = state.epochs * state.steps_per_epoch
        done = state.start_epoch * state.steps_per_epoch
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


class LineCallbacks(Callbacks):
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


def with_progress(fn: Callable[[Any], T]) -> T:
    """Call fn(callbacks) under a progress bar on a terminal, with one line per epoch elsewhere."""
    if live():
        with make_progress() as progress:
            return fn(ProgressCallbacks(progress))
    return fn(LineCallbacks())


# ---------------------------------------------------------------- jobs run by this process
def pretrain_report(spec: Any, out: Path, final: dict[str, Any], extra: dict[str, Any]) -> None:
    knn = f"{final['knn_top1']:.2f}%" if "knn_top1" in final else "n/a (no labelled test split)"
    console.print(f"final k-NN top-1 (offline, k={spec.eval.knn_k}, backbone features): [bold]{knn}[/bold]")
    console.print(f"encoder: {out / 'encoder.pt'}   metrics: {out / 'metrics.jsonl'}")
    if extra.get("registry_uri"):
        console.print(f"registered: [bold]{extra['registry_uri']}[/bold] (version {extra['model_version']}); "
                      f"load with mlflow.pytorch.load_model(\"{extra['registry_uri']}\")")


def ray_run_report(run: Any) -> None:
    """The lines of a pretraining run on Ray: its note, MLflow run, checkpoints, restarts."""
    if run.note:
        console.print(f"[yellow]{run.note}[/yellow]")
    console.print(f"MLflow run {run.run_id}; checkpoints in {run.storage}; {run.seconds:.0f} s"
                  + (f"; survived {run.restarts} restart(s), {run.epochs_redone} epoch(s) redone" if run.restarts else ""))
    print_promotion(getattr(run, "promotion", None))


def promotion_cell(p: dict[str, Any] | None) -> str:
    """A decision in a few words: `promoted 61.20 > 58.00 (v3)`, `kept 55.00 <= 58.00 (v3)`, `first 61.20`."""
    if not p:
        return ""
    cand, held, v = p.get("candidate"), p.get("holder"), p.get("holder_version")
    text = f"{p['decision']} @{p.get('alias')}"
    if cand is not None:
        text += f" {cand:.2f}"
    if held is not None:
        text += f" {'>' if p['decision'] == 'promoted' else 'vs'} {held:.2f} (v{v})"
    return text


def print_promotion(p: dict[str, Any] | None) -> None:
    if p:
        console.print(f"promotion: {p.get('reason') or promotion_cell(p)}")


def evaluation_table(result: dict[str, Any]) -> None:
    table = Table("protocol", "top-1 %")
    for k, v in result.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.2f}")
    console.print(table)
    print_promotion(result.get("promotion"))


def tune_header(spec: Any, out: Path) -> None:
    console.print(f"[bold]{spec.name}[/bold]: {spec.num_samples} trial(s) of {', '.join(spec.space)}, "
                  f"{spec.max_concurrent_trials} at a time, {spec.scheduler.type} scheduler, ranked by {spec.metric} "
                  f"({spec.direction}) -> {out}")


def tune_report(spec: Any, run: Any) -> None:
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


# ---------------------------------------------------------------- jobs of the REST API
class JobView:
    """A service job as it runs: a progress bar on a terminal, a line per epoch elsewhere."""

    def __init__(self) -> None:
        self.progress = make_progress() if live() else None
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


def job_report(job: dict) -> None:
    """A followed job's end: its result, registered model and MLflow run; exit 1 unless it succeeded."""
    result, p = job.get("result") or {}, job.get("progress") or {}
    if job["status"] != "succeeded":
        console.print(f"[red]job {job['id']} {job['status']}[/red]" + (f":\n{job['error']}" if job.get("error") else ""))
        print_result({"id": job["id"], "status": job["status"]})
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
    print_promotion(result.get("promotion"))
    if p.get("mlflow_run_url"):
        console.print(f"MLflow run: {p['mlflow_run_url']}")
    print_result({"id": job["id"], "status": job["status"], **result})


def jobs_table(items: list[dict]) -> None:
    table = Table("id", "kind", "name", "status", "created")
    for j in items:
        table.add_row(j["id"], j["kind"], j["name"], j["status"], j["created_at"][:19])
    console.print(table)


def models_table(models: list[dict]) -> None:
    table = Table("model", "version", "aliases", "k-NN top-1", "promotion", "job", "load with")
    for m in models:
        for v in m["versions"]:
            knn = v["metrics"].get("knn_top1")
            table.add_row(m["name"], v["version"], ",".join(v["aliases"]), f"{knn:.2f}" if knn is not None else "",
                          promotion_cell(v.get("promotion")), v.get("job_id") or "",
                          f"models:/{m['name']}@{v['aliases'][0]}" if v["aliases"] else v["uri"])
    console.print(table)
