"""The jobs `leoclr` runs itself: pretrain, evaluate, tune and embed, in this process or on Ray.

Each prints its report, logs its result to the job's MLflow run (contract.RESULT_ARTIFACT: where the
service reads it) and prints it as the last stdout line, as JSON. `leoclr run-job`, the driver of a
service's Ray Job, runs the same functions. Ray, MLflow and torch are imported only when a job runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from leoclr_core.cli.display import (
    console, evaluation_table, fail, live, pretrain_report, print_result, ray_run_report, tune_header, tune_report,
    with_progress,
)
from leoclr_core.spec.models import (
    EmbedSpec, EvaluateSpec, PretrainSpec, SpecError, TuneSpec, load_spec, parse_spec,
)


def load(path: Path, overrides: Optional[list[str]], kind: str) -> Any:
    """The spec at `path` with `overrides`; exit 2 naming the field if invalid or of another kind."""
    try:
        spec = load_spec(path, overrides or [])
    except SpecError as exc:
        fail(exc, code=2)
    if spec.kind != kind:
        fail(f"{path} is a '{spec.kind}' spec; this command runs '{kind}' specs", code=2)
    return spec


def cpus_needed(spec: Any) -> float:
    """Logical CPUs a job asks of Ray (its workers, data tasks; a search: its concurrent trials)."""
    from leoclr_core.spec.resources import job_resources

    return job_resources(spec)["CPU"]


def _sigterm_interrupts() -> None:
    """SIGTERM (the service cancelling a Ray Job, a pod stopping) ends the run as Ctrl-C does, so its
    MLflow run is closed as KILLED rather than left RUNNING. Set after ray.init, whose own handler
    would otherwise only log the signal."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def finish(result: dict[str, Any]) -> None:
    """Log the result to its MLflow run, if it has one, and print it.

    A result that cannot be logged fails nothing: the job's run, metrics and model are in MLflow
    already, and the line printed below still carries it; the service then shows no result."""
    result = json.loads(json.dumps(result, default=str))  # what is printed is what is logged
    run_id = result.get("mlflow_run_id")
    if run_id:
        from leoclr_core.tracking import log_result

        try:
            log_result(run_id, result)
        except Exception as exc:  # noqa: BLE001 - MLflow's errors vary by store; say it, keep the job's outcome
            console.print(f"[yellow]the result was not logged to MLflow run {run_id}: {exc}[/yellow]")
    print_result(result)


def pretrain(spec: PretrainSpec, out: Path, local: bool = False, device: Optional[str] = None) -> None:
    where = "in this process" if local else f"on Ray, {spec.scaling.num_workers} worker(s)"
    console.print(f"[bold]{spec.name}[/bold]: {spec.method} on {spec.data.source}, backbone {spec.model.backbone}, "
                  f"{spec.optim.epochs} epochs, {where} -> {out}")
    extra: dict[str, Any] = {}
    if local:
        from leoclr_core.training.pretrain import pretrain as run

        try:
            state = with_progress(lambda cb: run(spec, device=device, callbacks=cb, out_dir=out))
        except (ValueError, FileNotFoundError, FloatingPointError) as exc:  # FloatingPointError: diverged
            fail(exc)
        final = state.final
    else:
        final, extra = _pretrain_on_ray(spec, out)
    pretrain_report(spec, out, final, extra)
    finish({"name": spec.name, "out_dir": str(out), **extra, **{k: v for k, v in final.items() if k != 'type'}})


def _pretrain_on_ray(spec: PretrainSpec, out: Path) -> tuple[dict, dict]:
    from leoclr_core.distributed.pretrain import run_pretrain
    from leoclr_core.distributed.session import ray_session

    try:
        with ray_session(cpus_needed(spec), log_to_driver=not live()) as address:
            console.print(f"Ray: {address}")
            _sigterm_interrupts()
            run = with_progress(lambda cb: run_pretrain(spec, callbacks=cb, out_dir=out))
    except (ValueError, FileNotFoundError) as exc:
        fail(exc)
    except Exception as exc:  # noqa: BLE001 - Ray's errors carry the worker's traceback; say it, exit non-zero
        fail(f"{type(exc).__name__}: {exc}")
    enc = run.encoder
    extra = {"mlflow_run_id": run.run_id, "storage": run.storage, "worker_nodes": run.worker_nodes,
             "restarts": run.restarts,
             "epochs_redone": run.epochs_redone, "resumed_from": run.resumed_from, "seconds": round(run.seconds, 1),
             "model_uri": enc.model_uri if enc else None, "registry_uri": enc.registry_uri if enc else None,
             "model_version": enc.version if enc else None, "promotion": run.promotion,
             "already_finished": run.already_finished}
    ray_run_report(run)
    return run.state.final, extra


def evaluate(spec: EvaluateSpec, local: bool = False, device: Optional[str] = None) -> None:
    if local and spec.promote is not None:
        # The decision reads and writes the registry's aliases and tags; a --local run keeps no MLflow
        # run to record it against.
        fail("promote: an evaluate job with promote runs on Ray (drop --local), where the decision is "
             "recorded in the registry", code=2)
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

            with ray_session(cpus_needed(spec)):
                _sigterm_interrupts()
                result = run_evaluate(spec)
    except (ValueError, FileNotFoundError) as exc:
        fail(exc)
    except Exception as exc:  # noqa: BLE001 - a Ray task error wraps the real one; say it, exit non-zero
        cause = getattr(exc, "cause", None)
        fail(cause if isinstance(cause, (ValueError, FileNotFoundError)) else f"{type(exc).__name__}: {exc}")
    evaluation_table(result)
    finish(result)


def tune(spec: TuneSpec, out: Path) -> None:
    from leoclr_core.distributed.session import ray_session
    from leoclr_core.distributed.tune import run_tune

    tune_header(spec, out)
    try:
        # Tune prints its own trial table; the trials' Ray Data progress lines would bury it.
        with ray_session(cpus_needed(spec), log_to_driver=False) as address:
            console.print(f"Ray: {address}")
            _sigterm_interrupts()
            run = run_tune(spec, out_dir=out)
    except (ValueError, FileNotFoundError) as exc:
        fail(exc)
    except Exception as exc:  # noqa: BLE001 - say it, exit non-zero
        fail(f"{type(exc).__name__}: {exc}")
    tune_report(spec, run)
    enc, best = run.encoder, run.best or {}
    finish({
        "name": spec.name, "out_dir": str(out), "mlflow_run_id": run.run_id, "seconds": round(run.seconds, 1),
        "trials": len(run.table), "stopped_early": run.stopped_early, "best_trial": best.get("trial"),
        f"best_{spec.metric}": best.get(spec.metric), spec.metric: best.get(spec.metric),
        "registry_uri": enc.registry_uri if enc else None, "model_version": enc.version if enc else None,
        "already_finished": run.already_finished, "storage": run.storage, "table": run.table})


def embed(spec: EmbedSpec) -> None:
    from leoclr_core.distributed.embed import run_embed
    from leoclr_core.distributed.session import ray_session

    encoder = spec.encoder.model_uri or spec.encoder.checkpoint
    where = f"{spec.data.source} {spec.data.path}" if spec.data.path else spec.data.source
    console.print(f"[bold]{spec.name}[/bold]: embed {where} with {encoder}, {spec.replicas} replica(s)")
    try:
        with ray_session(cpus_needed(spec), log_to_driver=not live()) as address:
            console.print(f"Ray: {address}")
            _sigterm_interrupts()
            run = _with_embed_progress(lambda on_progress: run_embed(spec, on_progress=on_progress))
    except (ValueError, FileNotFoundError) as exc:
        fail(exc)
    except Exception as exc:  # noqa: BLE001 - Ray's errors carry the task's traceback; say it, exit non-zero
        fail(f"{type(exc).__name__}: {exc}")
    console.print(f"{run.images} images embedded ({run.dim}-d, {run.images_per_s:.0f} images/s) -> "
                  f"[bold]{run.output}[/bold]; MLflow run {run.run_id}")
    if run.skipped:
        console.print(f"[yellow]{len(run.skipped)} unreadable image(s) skipped, e.g. {run.skipped[0]}[/yellow]")
    finish(run.result(spec))


def _with_embed_progress(fn: Any) -> Any:
    """fn(on_progress) under a bar of images embedded on a terminal; silent elsewhere (the job's
    MLflow run has the same figures)."""
    if not live():
        return fn(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[bold]embedding", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task("embed", total=None)
        return fn(lambda done, total: progress.update(task, completed=done, total=total))


def run_job() -> None:
    """The job spec in $LEOCLR_JOB_SPEC (JSON), run on the Ray cluster this process is in."""
    from leoclr_core.contract import ENV_JOB_SPEC

    raw = os.environ.get(ENV_JOB_SPEC)
    if not raw:
        fail(f"{ENV_JOB_SPEC} is not set: it must hold the job spec as JSON", code=2)
    try:
        spec = parse_spec(json.loads(raw))
    except (json.JSONDecodeError, SpecError) as exc:
        fail(f"{ENV_JOB_SPEC}: {exc}", code=2)
    from leoclr_core.settings import core_settings

    if spec.kind == "embed":  # its default output is under the storage path, not a run folder
        embed(spec)
        return
    if not spec.output_dir:  # a job's driver runs in a Ray-chosen folder: keep the run with the data
        spec = spec.model_copy(update={"output_dir": str(core_settings().home / "runs" / spec.name)})
    if spec.kind == "pretrain":
        pretrain(spec, spec.out_dir)
    elif spec.kind == "tune":
        tune(spec, spec.out_dir)
    else:
        evaluate(spec)
