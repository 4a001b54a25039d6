"""A search on Ray Tune: each trial a Ray Train run of the base spec with some fields drawn.

The Train v2 pattern: Tune runs a small driver function per trial, which fits a `TorchTrainer`
(`run_pretrain`, the same path as a pretrain job) with Tune's report callback in its run
config, so every epoch's record (loss, k-NN accuracy) reaches Tune's scheduler and ASHA can stop
weak trials early. Trial names are deterministic (`trial-000`, ...): a search run again under
the same name and storage restores the Tune experiment, and each unfinished trial resumes its own
Ray Train run from its checkpoints.

The Tune experiment (`<storage>/<name>`) is restored only together with the search's MLflow parent
run in the tracking store in use, which names it (the parent's `leoclr.storage` tag):
- the parent FINISHED: the search is not run again; its result is returned as it was (the same
  parent and child runs, the same table, the same registered version: nothing registered twice);
- the parent is unfinished (an interrupted search): the experiment resumes into that parent;
- the store has no parent of it but the experiment exists (MLFLOW_TRACKING_URI names another
  store, or the runs were deleted): the trials' runs are not reachable from this store, so the
  search starts afresh, under `<storage>/<name>-<time>`, and says so (`TuneRun.note`);
- the parent FINISHED but the experiment is gone from the storage: it starts afresh, and says so.

MLflow: a parent run for the search (its spec as params; the ranked table as CSV and the
curves as PNG; the best trial's metrics), a child run per trial (its params and history, as any
pretrain job's run), the best trial's encoder registered under the search's `register`.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.util.placement_group import get_current_placement_group

from leoclr_core import contract, tracking
from leoclr_core.settings import CoreSettings, core_settings
from leoclr_core.spec.models import SearchDim, TuneSpec
from leoclr_core.spec.resources import TRIAL_DRIVER_CPU, data_bundles, per_trial_cpus
from leoclr_core.distributed.pretrain import resolve_storage, run_pretrain

log = logging.getLogger(__name__)

TAG_TRIAL, TAG_STOPPED_EARLY = contract.TAG_TRIAL, contract.TAG_STOPPED_EARLY


def domain(dim: SearchDim) -> Any:
    if dim.type == "choice":
        return tune.choice(dim.values)
    if dim.type == "grid":
        return tune.grid_search(dim.values)
    if dim.type == "uniform":
        return tune.uniform(dim.low, dim.high)
    return tune.loguniform(dim.low, dim.high)


def trial_name(trial: Any) -> str:
    """`trial-007` from Tune's counter (the experiment tag starts with it): the same trial of the
    same search always has the same name, so its Ray Train run and MLflow run are found again."""
    return f"trial-{int(str(trial.experiment_tag).split('_', 1)[0]):03d}"


def cluster_check(spec: TuneSpec, trial_cpus: float) -> None:
    """Refuse a search the cluster cannot place `max_concurrent_trials` of at once."""
    total = ray.cluster_resources()
    need_cpu = spec.max_concurrent_trials * trial_cpus
    if need_cpu > total.get("CPU", 0):
        raise ValueError(
            f"max_concurrent_trials ({spec.max_concurrent_trials}) x {trial_cpus:g} CPUs per trial = "
            f"{need_cpu:g} CPUs, but the cluster has {total.get('CPU', 0):g}; lower max_concurrent_trials or "
            "base.scaling, or add nodes")
    sc = spec.base.scaling
    if sc.use_gpu:
        need_gpu = spec.max_concurrent_trials * sc.num_workers * sc.gpus_per_worker
        if need_gpu > total.get("GPU", 0):
            raise ValueError(f"max_concurrent_trials ({spec.max_concurrent_trials}) x {sc.num_workers} workers x "
                             f"{sc.gpus_per_worker:g} GPUs = {need_gpu:g} GPUs, but the cluster has "
                             f"{total.get('GPU', 0):g}")


def _trial(config: dict[str, Any], *, spec_json: dict[str, Any], parent_run_id: str, settings_json: dict[str, Any],
           out_dir: str, experiment_dir: str) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ.pop(contract.ENV_JOB_ID, None)  # the service finds the search's parent run, not a trial's
    spec = TuneSpec.model_validate(spec_json)
    name = tune.get_context().get_trial_name()
    # Named after the Tune experiment's folder, so a search started afresh trains its trials afresh.
    tspec = spec.trial_spec(config, name=f"{experiment_dir}-{name}")
    run_pretrain(tspec, out_dir=Path(out_dir) / name, settings=CoreSettings(**settings_json), experiment=spec.name,
                 run_tags={"mlflow.parentRunId": parent_run_id, TAG_TRIAL: name},
                 train_callbacks=[TuneReportCallback()], data_placement=get_current_placement_group())


def trial_resources(spec: TuneSpec, config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """A trial's placement group: its own function (which only drives its TorchTrainer; the
    trainer's workers have their own group) and its data bundles (`resources.data_bundles`), which
    its Ray Data tasks run in. Tune removes it when the trial ends, however it ends."""
    return tune.PlacementGroupFactory([{"CPU": TRIAL_DRIVER_CPU}, *data_bundles(spec.trial_spec(config))])


class MlflowTrialStatus(tune.Callback):
    """Closes each trial's MLflow run as Tune ends it: a trial ASHA stops is killed inside its
    actor, before its own code can say so. FINISHED ran all epochs; KILLED + stopped_early did not."""

    def __init__(self, spec: TuneSpec, parent_run_id: str, settings: CoreSettings):
        self.spec, self.parent, self.settings = spec, parent_run_id, settings

    def _close(self, trial: Any, error: bool) -> None:
        try:
            run = _child_runs(self.parent, self.settings, f"tags.`{TAG_TRIAL}` = '{trial_name(trial)}'")
            if not run:
                return
            epoch = (trial.last_result or {}).get("epoch", 0)
            close_trial_run(tracking.client(self.settings), run[0].info.run_id, error=error,
                            stopped_early=not error and epoch < self.spec.base.optim.epochs)
        except Exception as exc:  # noqa: BLE001 - bookkeeping must not stop the search
            log.warning("closing the MLflow run of %s failed: %s", trial, exc)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, error=True)


def close_trial_run(c: Any, run_id: str, *, error: bool, stopped_early: bool, force: bool = False) -> None:
    """A trial's MLflow run closed as its trial ended: FAILED on an error, KILLED (tagged stopped
    early) when the scheduler stopped it, else FINISHED. A run already closed keeps its status
    unless it was stopped early or `force` (after the search, a stopped trial's own cleanup may
    have closed its run as FAILED after this closed it as KILLED)."""
    status = "FAILED" if error else "KILLED" if stopped_early else "FINISHED"
    if stopped_early:
        c.set_tag(run_id, TAG_STOPPED_EARLY, "true")
    if force or status == "KILLED" or c.get_run(run_id).info.status == "RUNNING":
        c.set_terminated(run_id, status)


def _child_runs(parent_run_id: str, settings: CoreSettings, extra: str = "") -> list[Any]:
    c = tracking.client(settings)
    exp = c.get_run(parent_run_id).info.experiment_id
    flt = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" + (f" and {extra}" if extra else "")
    return c.search_runs([exp], filter_string=flt, max_results=1000)


@dataclass
class TuneRun:
    run_id: str
    table: list[dict[str, Any]]  # ranked, best first
    best: dict[str, Any] | None
    encoder: tracking.RegisteredEncoder | None
    seconds: float
    storage: str
    stopped_early: int = 0
    already_finished: bool = False  # the search had finished before this call: nothing ran
    note: str | None = None  # how a re-run of a finished search was answered, for people


def _rank(spec: TuneSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(r: dict[str, Any]) -> float:
        v = r.get(spec.metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return math.inf
        return -v if spec.direction == "max" else v
    return sorted(rows, key=key)


def _write_table(path: Path, spec: TuneSpec, rows: list[dict[str, Any]]) -> None:
    cols = ["rank", "trial", *spec.space, spec.metric, "best_" + spec.metric, "epochs", "stopped_early", "status",
            "mlflow_run_id"]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for i, r in enumerate(rows, 1):
            w.writerow({"rank": i, **r})


def _plot(path: Path, spec: TuneSpec, curves: dict[str, list[tuple[int, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(curves.items()):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"{spec.name}: {spec.metric} per trial ({spec.scheduler.type} scheduler)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def search_path(spec: TuneSpec, storage: str, settings: CoreSettings) -> tuple[str, Any, str | None]:
    """Where the search's Tune experiment is (or goes), its newest parent run in this tracking
    store (None: none), and a note when it starts afresh (see the module's docstring)."""
    c = tracking.client(settings)
    exp = c.get_experiment_by_name(spec.name)
    default = f"{storage}/{spec.name}"
    runs = [] if exp is None else c.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{contract.TAG_JOB}` = '{spec.name}' and "
                                           f"tags.`{contract.TAG_KIND}` = 'tune'",
        order_by=["attributes.start_time DESC"], max_results=100)
    for run in runs:
        path = run.data.tags.get(contract.TAG_STORAGE, "")
        if path == default or path.startswith(default + "-"):
            if tracking.is_finished(run) and not tune.Tuner.can_restore(path):
                return path, run, (f"search {spec.name} finished before, but its Ray Tune experiment is no "
                                   f"longer in {path}: it starts afresh")
            return path, run, None
    if tune.Tuner.can_restore(default):
        fresh = f"{default}-{time.strftime('%Y%m%d-%H%M%S')}"
        return fresh, None, (f"search {spec.name} has a Ray Tune experiment in {default}, but the tracking store "
                             f"{settings.tracking_uri} has no MLflow run of it (it was tracked in another store, "
                             f"or its runs were deleted): it starts afresh, in {fresh}")
    return default, None, None


def run_tune(spec: TuneSpec, *, out_dir: Path | None = None, settings: CoreSettings | None = None) -> TuneRun:
    """Run the search on the connected Ray cluster; blocks until every trial has ended. A search
    that finished before returns its result without running (the module's docstring says when)."""
    s = settings or core_settings()
    out = Path(out_dir) if out_dir else spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cpus = per_trial_cpus(spec)
    storage = resolve_storage(s.ray_storage)
    path, prior, note = search_path(spec, storage, s)
    if note:
        log.warning(note)
    name = path.rsplit("/", 1)[-1]

    def trainable(parent: str) -> Any:
        fn = tune.with_parameters(
            _trial, spec_json=spec.model_dump(mode="json"), parent_run_id=parent,
            settings_json={"data_dir": str(s.home), "mlflow_tracking_uri": s.tracking_uri, "storage_path": storage},
            out_dir=str(out / "trials"), experiment_dir=name)
        return tune.with_resources(fn, lambda config: trial_resources(spec, config))

    if note is None and tracking.is_finished(prior):
        tracking.claim_run(prior.info.run_id, s)
        grid = tune.Tuner.restore(path, trainable=trainable(prior.info.run_id)).get_results()
        return _result(spec, grid, prior.info.run_id, out, path, s, started, finished=True)
    cluster_check(spec, cpus)
    parent = tracking.start_job_run(spec, path, settings=s)
    outcome = "FAILED"
    try:
        if tune.Tuner.can_restore(path):
            log.warning("resuming search %s from %s", spec.name, path)
            tuner = tune.Tuner.restore(path, trainable=trainable(parent), resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable(parent), param_space={p: domain(d) for p, d in spec.space.items()},
                               tune_config=_tune_config(spec),
                               run_config=tune.RunConfig(
                                   name=name, storage_path=storage,
                                   callbacks=[MlflowTrialStatus(spec, parent, s)],
                                   failure_config=tune.FailureConfig(max_failures=0)))
        run = _result(spec, tuner.fit(), parent, out, path, s, started)
        run.note = note
        outcome = "FINISHED"
        return run
    except KeyboardInterrupt:
        outcome = "KILLED"
        raise
    finally:
        tracking.end_run(parent, outcome, settings=s)


def _rows(spec: TuneSpec, grid: Any) -> tuple[list[dict[str, Any]], dict[str, list[tuple[int, float]]]]:
    """A row per trial (its drawn values, final and best metric, epochs, status) and its curve."""
    rows, curves = [], {}
    for result in grid:
        if result.metrics is None and result.error is None:
            continue
        m = result.metrics or {}
        df = result.metrics_dataframe
        name = Path(result.path).name  # trial_dirname_creator: the trial's name
        history = []
        if df is not None and spec.metric in df and "epoch" in df:
            history = [(int(e), float(v)) for e, v in zip(df["epoch"], df[spec.metric]) if v == v]
        curves[name] = history
        values = [v for _, v in history]
        rows.append({
            "trial": name, **{p: result.config.get(p) for p in spec.space},
            spec.metric: m.get(spec.metric),
            "best_" + spec.metric: (max(values) if spec.direction == "max" else min(values)) if values else None,
            "epochs": m.get("epoch", 0), "stopped_early": m.get("epoch", 0) < spec.base.optim.epochs,
            "status": "error" if result.error else "done",
        })
    return rows, curves


def _result(spec: TuneSpec, grid: Any, parent: str, out: Path, path: str, s: CoreSettings, started: float,
            finished: bool = False) -> TuneRun:
    """The ranked table, the parent run's artifacts and summary, and the best trial's encoder
    registered. `finished`: a search that had finished before, whose runs are only read."""
    rows, curves = _rows(spec, grid)
    runs = {r.data.tags.get(TAG_TRIAL): r.info.run_id for r in _child_runs(parent, s)}
    c = tracking.client(s)
    for r in rows:
        r["mlflow_run_id"] = runs.get(r["trial"])
        # Once more, after the search (a cleanup that comes even later finds the run closed and
        # leaves it: tracking.end_run).
        if r["mlflow_run_id"] and not finished:
            close_trial_run(c, r["mlflow_run_id"], error=r["status"] == "error", stopped_early=r["stopped_early"],
                            force=True)
    table = _rank(spec, rows)
    best = next((r for r in table if r["status"] == "done" and r.get(spec.metric) is not None
                 and not r["stopped_early"] and r["mlflow_run_id"]), None)
    artifacts = ["trials.csv", "trials.png"]
    _write_table(out / "trials.csv", spec, table)
    _plot(out / "trials.png", spec, curves)
    stopped = sum(bool(r["stopped_early"]) for r in table)
    encoder = None
    if finished:
        if best is not None:
            encoder = tracking.registered_version(best["mlflow_run_id"], spec.register, settings=s)
        note = (f"search {spec.name} had already finished (MLflow parent run {parent}): its result is returned "
                "as it was, nothing is run or registered again")
        log.warning(note)
        return TuneRun(run_id=parent, table=table, best=best, encoder=encoder, seconds=time.perf_counter() - started,
                       storage=path, stopped_early=stopped, already_finished=True, note=note)
    for f in artifacts:
        c.log_artifact(parent, str(out / f))
    summary = {"trials": len(table), "trials_stopped_early": stopped}
    if best is not None:
        summary.update({f"best_{spec.metric}": best[spec.metric]})
        c.set_tag(parent, contract.TAG_BEST_TRIAL, best["trial"])
        c.set_tag(parent, contract.TAG_BEST_RUN_ID, best["mlflow_run_id"])
        encoder = tracking.register_logged_encoder(best["mlflow_run_id"], spec.register,
                                                   {spec.metric: best[spec.metric]}, settings=s)
    tracking.log_metrics(c, parent, summary, step=0)
    return TuneRun(run_id=parent, table=table, best=best, encoder=encoder, seconds=time.perf_counter() - started,
                   storage=path, stopped_early=stopped)


def _tune_config(spec: TuneSpec) -> tune.TuneConfig:
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if spec.scheduler.type == "asha":
        # max_t one past the last epoch: ASHA stops a trial that reaches max_t, and a trial stopped at
        # its last report would be killed before it logs its encoder.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=spec.base.optim.epochs + 1,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.seed)
    else:
        from ray.tune.search import BasicVariantGenerator

        # It limits concurrency itself (Tune ignores max_concurrent_trials for it and says so).
        search_alg = BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent_trials)
    return tune.TuneConfig(metric=spec.metric, mode=spec.direction, scheduler=scheduler, search_alg=search_alg,
                           num_samples=spec.num_samples,
                           max_concurrent_trials=spec.max_concurrent_trials if spec.search == "optuna" else None,
                           trial_name_creator=trial_name, trial_dirname_creator=trial_name)
