"""A pretrain job on Ray Train: the driver builds a `TorchTrainer` from the spec; each worker runs
the in-process engine (`leoclr_core.training.pretrain.pretrain`) on its Ray Data shard under DDP.

What the driver owns: the MLflow run (found again when a job resumes), the dataset, the
trainer, the progress display, and, after `fit`, the run folder (`encoder.pt`, `metrics.jsonl`,
`summary.json`) and the registered encoder. What rank 0 owns: metrics into MLflow as they
happen, checkpoints through `ray.train.report` every `checkpoint.every` epochs.

Fault tolerance is Ray Train's: a dead worker fails the worker group, which restarts (up to
`checkpoint.max_failures` times) from the newest reported checkpoint. A loss that stops being
finite is not retried: the workers end, and the driver raises FloatingPointError naming the step.
Re-running a job with the same name and storage path resumes it (Ray Train v2).

Object-store locations (an `s3://` storage path or data path) are tried before anything else
(`check_storage`): a store that refuses the credentials of the standard AWS_* variables fails the
job at once with a `StorageError` naming the location, not deep inside Ray Train or Ray Data.

Re-running a job that already trained all its epochs trains nothing (`RayRun.note` says which):
- its MLflow run FINISHED in this tracking store: that run is its result, returned as it is (the
  same run, k-NN and registered version; no second version of the same weights);
- its final checkpoint is in the storage but this store has no finished run of it (a driver
  that died between training and registering, or MLFLOW_TRACKING_URI now names another store):
  the result is made again from that checkpoint into this store's run (the encoder logged and
  registered once there; the per-step history stays where the training logged it);
- its checkpoints are gone: it trains afresh, in a new MLflow run.

With `register.promote`, the driver decides after registering whether the new version takes the
promotion alias (`distributed.evaluate.decide_promotion`): its final evaluation against the
holder's value on the same data, which a Ray task measures unless the holder carries it already.

The data pipeline holds its CPUs from the start: a placement group of the Ray Data share of
`resources.job_resources` (its view workers and one CPU for reads and decoding) that Ray Data's
tasks run in, with Ray Data's resource limits set to it. Training workers (this job's or another's)
can never take them, so a job placed on exactly the CPUs it asks for runs to its end.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from leoclr_core import contract, tracking
from leoclr_core.distributed.data import (
    RayFeed, SkipCounter, build_dataset, check_readable, check_writable, is_uri,
)
from leoclr_core.distributed.evaluate import decide_promotion
from leoclr_core.distributed.progress import Follower, ProgressLog, PushProgress
from leoclr_core.nn import collectives as dist
from leoclr_core.nn.methods import MomentumMethod
from leoclr_core.settings import CoreSettings, core_settings
from leoclr_core.spec.models import PretrainSpec
from leoclr_core.spec.resources import data_bundles
from leoclr_core.training.callbacks import AllCallbacks, Callbacks, RunState
from leoclr_core.training.checkpoint import CheckpointStore, OnSaved, atomic_save, backbone_from_state, load_checkpoint
from leoclr_core.training.engine import Runtime
from leoclr_core.training.pretrain import has_test_split, pretrain
from leoclr_core.training.run_folder import RunFolder

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


# ---------------------------------------------------------------- checkpoints: ray.train.report
class RayTrainStore(CheckpointStore):
    """Every worker reports each epoch (Ray Train needs the same number of reports from all);
    rank 0 attaches the checkpoint when one is due. `on_saved` sees the file before its upload."""

    def latest(self) -> dict[str, Any] | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_checkpoint(Path(d) / CHECKPOINT_FILE)

    def end_epoch(self, record: dict[str, Any], state: Callable[[], dict[str, Any]] | None,
                  on_saved: OnSaved) -> None:
        metrics = contract.numbers(record)
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="leoclr-ckpt-") as tmp:
            path = atomic_save(state(), Path(tmp) / CHECKPOINT_FILE)
            on_saved(path, record["epoch"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch-{record['epoch']:04d}")


# ---------------------------------------------------------------- the worker
def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec = PretrainSpec.model_validate(config["spec"])
    settings = CoreSettings(data_dir=config["data_dir"], mlflow_tracking_uri=config["tracking_uri"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    nodes = [ray.get_runtime_context().get_node_id()]
    if dist.is_distributed():  # the process group is Ray Train's, set up before this function runs
        gathered: list[Any] = [None] * dist.world_size()
        torch.distributed.all_gather_object(gathered, nodes[0])
        nodes = gathered
    if rank == 0:
        config["progress"].push.remote({"type": "placement", "nodes": nodes})
    callbacks: list[Callbacks] = []
    if rank == 0:
        callbacks += [PushProgress(config["progress"]),
                      tracking.MlflowCallbacks(config["run_id"], log_checkpoints=spec.checkpoint.log_to_mlflow,
                                               settings=settings)]

    def feed(s: PretrainSpec, method: MomentumMethod, runtime: Runtime) -> RayFeed:
        return RayFeed(s, method, runtime, config["num_images"], config.get("counter"))

    try:
        pretrain(spec, device=ray.train.torch.get_device(), callbacks=AllCallbacks(*callbacks), feed=feed,
                 store=RayTrainStore(), write_outputs=False)
    except FloatingPointError as exc:
        # A diverged run is not a worker failure: restarted from its last checkpoint, it would replay
        # the same steps into the same NaN, checkpoint.max_failures times. The loss is all-reduced,
        # so every worker stops here at the same step; they end normally and the driver raises.
        if rank == 0:
            ray.get(config["progress"].push.remote({"type": "diverged", "error": str(exc)}))


# ---------------------------------------------------------------- the driver
@dataclass
class RayRun:
    """What a finished Ray pretrain job leaves: its folder, MLflow run, encoder, and the restarts it survived."""

    state: RunState
    run_id: str
    storage: str
    encoder: tracking.RegisteredEncoder | None = None
    restarts: int = 0
    epochs_redone: int = 0
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)  # node id of each worker, by rank
    resumed_from: list[int] = field(default_factory=list)  # completed epochs each restart resumed after
    already_finished: bool = False  # the job had trained all its epochs before this call: nothing trained
    note: str | None = None  # how a re-run of a finished job was answered, for people
    promotion: dict[str, Any] | None = None  # the promotion decision (register.promote), as tracking records it


def check_storage(spec: PretrainSpec, s: CoreSettings) -> None:
    """Before anything trains: the object-store locations of the job answer with the credentials
    this process has (the standard AWS_* variables), or the job fails here naming the location and
    the likely cause, rather than deep in Ray Train or Ray Data. Local paths are left to the
    errors that name them already."""
    d = spec.data
    if d.source in ("imagefolder", "parquet") and is_uri(d.path):
        check_readable(d.path, "data")  # type: ignore[arg-type]
    storage = spec.checkpoint.storage_path or s.ray_storage
    if is_uri(storage):
        check_writable(storage, "checkpoint storage")


def resolve_storage(storage: str) -> str:
    """Ray Train and Tune want an absolute path (created here) or a URI."""
    if "://" in storage:
        return storage
    path = Path(storage).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def run_pretrain(
    spec: PretrainSpec,
    *,
    callbacks: Callbacks | None = None,
    out_dir: Path | None = None,
    settings: CoreSettings | None = None,
    experiment: str | None = None,
    run_tags: dict[str, str] | None = None,
    train_callbacks: list[Any] | None = None,
    data_placement: PlacementGroup | None = None,
) -> RayRun:
    """Run `spec` on the connected Ray cluster (`ray.init` done by the caller); blocks until done.

    A Tune trial passes the search's MLflow `experiment` and `run_tags` (its parent run),
    `train_callbacks` (Tune's report callback, so each epoch's record reaches the scheduler) and
    `data_placement`, its own placement group, which holds its data bundles (Tune removes it with
    the trial, also when it stops the trial early; a group this function made would outlive a
    trial killed that way). Without one, the data CPUs are reserved here for the run."""
    s = settings or core_settings()
    cb = callbacks or Callbacks()
    out = Path(out_dir) if out_dir else spec.out_dir
    started = time.perf_counter()
    promote = spec.register.promote
    check_storage(spec, s)
    if promote is not None and not has_test_split(spec.data):
        raise ValueError(f"register.promote compares {promote.metric} on a labelled test split, and data "
                         f"({spec.data.source} at {spec.data.path}) has none (num_test_images 0, or "
                         "Parquet without a test split)")
    storage = resolve_storage(spec.checkpoint.storage_path or s.ray_storage)
    # Ray Train v2 resumes a run re-run under the same name and storage; resume: false gets a fresh name.
    run_name = spec.name if spec.checkpoint.resume else f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = f"{storage}/{run_name}"
    trained = final_checkpoint(spec, path) if spec.checkpoint.resume else None
    note = None
    if trained is not None:
        prior = tracking.latest_job_run(spec, path, settings=s, experiment=experiment)
        if tracking.is_finished(prior):
            return _finished(spec, out, trained, prior.info.run_id, path, s, started)  # type: ignore[union-attr]
    elif spec.checkpoint.resume and tracking.is_finished(
            tracking.latest_job_run(spec, path, settings=s, experiment=experiment)):
        note = (f"job {spec.name} finished before, but its checkpoints are no longer in {path}: "
                "it trains afresh, in a new MLflow run")
        log.warning(note)
    run_id = tracking.start_job_run(spec, path, settings=s, experiment=experiment, extra_tags=run_tags)
    outcome = "FAILED"
    try:
        if trained is not None:
            note = (f"job {spec.name} had trained all {spec.optim.epochs} epochs (its final checkpoint is in "
                    f"{path}), but the tracking store {s.tracking_uri} has no finished MLflow run of it (its "
                    "driver ended before it registered, or it was tracked in another store): its encoder is "
                    f"logged to run {run_id} from that checkpoint, without training again")
            log.warning(note)
            run = _export(spec, out, _load_final(trained), None, run_id, path, s)
            checkpoint_path = checkpoint_location(trained, path)
        else:
            run, checkpoint_path = _fit(spec, cb, out, run_id, run_name, storage, s, train_callbacks, data_placement)
        run.seconds, run.note = time.perf_counter() - started, note
        RunFolder(out).write_summary(spec, run.state.final, mlflow_run_id=run_id, storage=run.storage,
                                     checkpoint=checkpoint_path, **_encoder_fields(run.encoder),
                                     restarts=run.restarts, epochs_redone=run.epochs_redone, seconds=run.seconds,
                                     worker_nodes=run.worker_nodes, resumed_from=run.resumed_from,
                                     promotion=run.promotion)
        outcome = "FINISHED"
        return run
    except KeyboardInterrupt:  # Ctrl-C, or the service cancelling the job (its driver gets SIGTERM)
        outcome = "KILLED"
        raise
    finally:
        tracking.end_run(run_id, outcome, settings=s)


def _encoder_fields(encoder: tracking.RegisteredEncoder | None) -> dict[str, str | None]:
    """The summary's fields of the logged and registered encoder."""
    return {"model_uri": encoder.model_uri if encoder else None,
            "registry_uri": encoder.registry_uri if encoder else None,
            "model_version": encoder.version if encoder else None}


def _fit(spec: PretrainSpec, cb: Callbacks, out: Path, run_id: str, run_name: str, storage: str, s: CoreSettings,
         train_callbacks: list[Any] | None, data_placement: PlacementGroup | None) -> tuple[RayRun, str]:
    """Train (or resume) on Ray Train; the run and the path of its final checkpoint."""
    pg = data_placement or data_placement_group(spec)
    try:
        # The job's bookkeeping actors live on the driver's node: left to Ray, one may land on a worker
        # node, and a node that dies takes it along even as Ray Train restores the worker group
        # elsewhere (the driver's last read of it then fails the job).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        counter = (SkipCounter.options(scheduling_strategy=here).remote()
                   if spec.data.source in ("imagefolder", "parquet") else None)
        dataset, num_images = build_dataset(spec, counter, placement_group=pg)
        progress = ProgressLog.options(scheduling_strategy=here).remote()
        sc = spec.scaling
        resources = {"CPU": sc.cpus_per_worker}
        if sc.use_gpu:
            resources["GPU"] = sc.gpus_per_worker
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "spec": spec.model_dump(mode="json"), "run_id": run_id, "tracking_uri": s.tracking_uri,
                "data_dir": str(s.home), "progress": progress, "counter": counter, "num_images": num_images,
            },
            scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                         resources_per_worker=resources, placement_strategy=sc.placement_strategy),
            run_config=RunConfig(
                name=run_name, storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
                failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures),
                callbacks=train_callbacks,
            ),
            datasets={"train": dataset},
            dataset_config=ingest_config(spec),
        )
        with Follower(progress, cb, out) as follower:
            result = trainer.fit()
    finally:
        if data_placement is None:
            remove_placement_group(pg)
    if follower.diverged:
        raise FloatingPointError(follower.diverged)
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} reported no checkpoint; nothing to export")
    return _export(spec, out, _load_final(result.checkpoint), follower, run_id, f"{storage}/{run_name}", s), \
        checkpoint_location(result.checkpoint, storage)


def checkpoint_location(checkpoint: ray.train.Checkpoint, storage: str) -> str:
    """Where a checkpoint is, as its storage path names it: Ray Train gives an object store's
    path without its scheme (bucket/prefix/...)."""
    if is_uri(storage) and not is_uri(checkpoint.path):
        return f"{storage.split('://', 1)[0]}://{checkpoint.path}"
    return checkpoint.path


def _load_final(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return load_checkpoint(Path(d) / CHECKPOINT_FILE)


def final_checkpoint(spec: PretrainSpec, path: str) -> ray.train.Checkpoint | None:
    """The last epoch's checkpoint of the Ray Train run at `path`, if it trained all its epochs."""
    try:
        result = ray.train.Result.from_path(path)
    except (RuntimeError, OSError):  # no run there, or one that never registered a checkpoint
        return None
    if result.checkpoint is None or (result.metrics or {}).get("epoch") != spec.optim.epochs:
        return None
    return result.checkpoint


def _finished(spec: PretrainSpec, out: Path, trained: ray.train.Checkpoint, run_id: str, path: str,
              s: CoreSettings, started: float) -> RayRun:
    """A job re-run after it finished: the result its MLflow run holds (read, not written again),
    its final metrics from its final checkpoint. Its run folder is written again only where it is
    missing or belongs to another run."""
    tracking.claim_run(run_id, s)
    final_state = _load_final(trained)
    final = final_state.get("metrics", {})
    encoder = tracking.registered_version(run_id, spec.register, settings=s)
    folder = RunFolder(out)
    records = folder.records()
    state = RunState(out_dir=out, epochs=spec.optim.epochs, steps_per_epoch=0, start_epoch=spec.optim.epochs,
                     history=[r for r in records if r.get("type") == "epoch"], final=final)
    note = (f"job {spec.name} had already finished (MLflow run {run_id}): its result is returned as it was, "
            "nothing is trained or registered again")
    log.warning(note)
    run = RayRun(state=state, run_id=run_id, storage=path, encoder=encoder, records=records,
                 seconds=time.perf_counter() - started, already_finished=True, note=note,
                 promotion=_recorded_promotion(spec, encoder, s))
    if folder.summary_run_id() != run_id:
        folder.create(spec)
        folder.write_encoder(backbone_from_state(final_state, "the final checkpoint")[0], spec, final)
        folder.write_summary(spec, final, mlflow_run_id=run_id, storage=path,
                             checkpoint=checkpoint_location(trained, path), **_encoder_fields(encoder),
                             already_finished=True)
    return run


def _export(spec: PretrainSpec, out: Path, final_state: dict[str, Any], follower: Follower | None, run_id: str,
            storage: str, s: CoreSettings) -> RayRun:
    """The run folder and the registered encoder, from the final checkpoint. Without a follower
    (nothing trained in this call) the run folder's records, if any, are kept."""
    folder = RunFolder(out)
    folder.create(spec)
    records = follower.records if follower is not None else folder.records()
    folder.write_records(records)
    backbone, _ = backbone_from_state(final_state, "the final checkpoint")
    state = (follower.state if follower is not None else None) or RunState(
        out_dir=out, epochs=spec.optim.epochs, steps_per_epoch=0, start_epoch=spec.optim.epochs,
        history=[r for r in records if r.get("type") == "epoch"])
    state.final = final_state.get("metrics", {})
    folder.write_encoder(backbone, spec, state.final)
    encoder = tracking.log_encoder(run_id, backbone, spec.model, spec.data, spec.register,
                                   metrics=state.final, settings=s)
    promotion = _promote(spec, encoder, state.final, s)
    if follower is None:
        return RayRun(state=state, run_id=run_id, storage=storage, encoder=encoder, records=records,
                      promotion=promotion)
    return RayRun(state=state, run_id=run_id, storage=storage, encoder=encoder, restarts=follower.restarts,
                  epochs_redone=follower.redone, records=follower.records, worker_nodes=follower.nodes,
                  resumed_from=follower.resumed_from, promotion=promotion)


def _promote(spec: PretrainSpec, encoder: tracking.RegisteredEncoder, final: dict[str, Any],
             s: CoreSettings) -> dict[str, Any] | None:
    """The promotion decision for the version just registered (none without register.promote).
    The candidate's value is its final evaluation, measured in training on the same data."""
    promote = spec.register.promote
    if promote is None or encoder.name is None or encoder.version is None:
        return None
    decision = decide_promotion(encoder.name, encoder.version, promote, final.get(promote.metric), spec.data,
                                spec.eval, spec.scaling, s)
    return decision.as_dict()


def _recorded_promotion(spec: PretrainSpec, encoder: tracking.RegisteredEncoder | None,
                        s: CoreSettings) -> dict[str, Any] | None:
    """A finished job's decision, as its version's tags hold it (it is not made again)."""
    if spec.register.promote is None or encoder is None or encoder.name is None or encoder.version is None:
        return None
    return tracking.promotion_of(encoder.name, encoder.version, s)


# ---------------------------------------------------------------- the data pipeline's own CPUs
def data_placement_group(spec: PretrainSpec) -> PlacementGroup:
    """The CPUs of the job's Ray Data tasks (`resources.data_bundles`), reserved before the
    training workers take theirs and held until the job ends. Waits until Ray has placed it (on
    a cluster an autoscaler grows, that can take a while: said every minute)."""
    pg = placement_group(data_bundles(spec), strategy="PACK")
    while not pg.wait(timeout_seconds=60):
        log.warning("job %s: waiting for Ray to place its data pipeline's CPUs %s (the cluster has %s free)",
                    spec.name, pg.bundle_specs, ray.available_resources().get("CPU", 0))
    return pg


def ingest_config(spec: PretrainSpec) -> ray.train.DataConfig:
    """Ray Data's resource limits for the training stream: the CPUs reserved for it, so that it
    plans its operators for what it has rather than for the whole cluster."""
    from ray.data import DataContext

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.resource_limits = options.resource_limits.copy(cpu=sum(b["CPU"] for b in data_bundles(spec)))
    return ray.train.DataConfig(execution_options=options)
