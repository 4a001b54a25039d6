"""A whole pretraining run in one process: data, views, method, epochs, k-NN, checkpoints, outputs.

The Ray layer runs this same loop inside each worker; here it runs without Ray (`--local`, tests,
the GPU benchmark box). What it composes: a feed (`training.feed`; Ray passes its own), the
engine's epochs, a checkpoint store (`training.checkpoint`; Ray passes its own), callbacks, and,
where this process owns it, the run folder (`training.run_folder`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from leoclr_core.data import ImageSource
from leoclr_core.evaluation.probes import EvalResult, evaluate_backbone
from leoclr_core.nn import collectives as dist
from leoclr_core.nn.methods import MomentumMethod, build_method
from leoclr_core.spec.models import DataSpec, PretrainSpec
from leoclr_core.training.callbacks import Callbacks, RunState
from leoclr_core.training.checkpoint import CheckpointStore, FolderStore, restore_training_state, training_state
from leoclr_core.training.engine import (
    Runtime,
    build_optimizer,
    build_scheduler,
    prepare_method,
    resolve_runtime,
    train_epoch,
)
from leoclr_core.training.feed import Feed, ViewFeed, job_source
from leoclr_core.training.run_folder import RunFolder

log = logging.getLogger(__name__)


def has_test_split(data: DataSpec) -> bool:
    """Whether a test split for k-NN can be built: none for a Parquet source that is not
    pre-split, or with num_test_images 0. Image folders and Parquet are read from a local path or
    an object-store URI alike (pyarrow's filesystems), so a job reading s3:// runs k-NN too."""
    if data.num_test_images == 0:
        return False
    if data.path and "://" in data.path and data.source not in ("imagefolder", "parquet"):
        return False  # the other sources are local files only
    if data.source == "parquet":
        from leoclr_core.data.parquet import parquet_split_paths

        return parquet_split_paths(data.path)[1] is not None  # type: ignore[arg-type]
    return True


def run_knn(
    backbone: nn.Module, spec: PretrainSpec, runtime: Runtime, train_set: ImageSource | None,
    test_set: ImageSource | None, linear: bool = False,
) -> EvalResult:
    if test_set is None or train_set is None or not train_set.labelled or not train_set.num_classes:
        return EvalResult()
    d, e = spec.data, spec.eval
    return evaluate_backbone(
        backbone, train_set, test_set, runtime, num_classes=train_set.num_classes, size=d.image_size,
        mean=d.mean, std=d.std, knn=True, linear=linear, k=e.knn_k, knn_temperature=e.knn_temperature,
        probe_epochs=e.probe_epochs, probe_lr=e.probe_lr,
    )


FeedFactory = Callable[[PretrainSpec, MomentumMethod, Runtime], Feed]


def pretrain(
    spec: PretrainSpec,
    *,
    device: torch.device | str | None = None,
    callbacks: Callbacks | None = None,
    out_dir: Path | None = None,
    feed: FeedFactory | None = None,
    store: CheckpointStore | None = None,
    write_outputs: bool = True,
) -> RunState:
    """Run (or resume) the pretraining described by `spec`; returns the history and final metrics.

    In-process by default. The Ray layer passes its own `feed` (a Ray Data shard), `store`
    (`ray.train.report`) and `write_outputs=False` (its driver writes the run folder).
    """
    cb = callbacks or Callbacks()
    out = Path(out_dir) if out_dir else spec.out_dir
    main = dist.rank() == 0
    folder = RunFolder(out) if main and write_outputs else None
    if folder is not None:
        folder.create(spec)
    runtime = resolve_runtime(spec.scaling, device)
    if spec.scaling.num_workers > 1 and not dist.is_distributed():
        # Workers are started by the Ray layer (or any launcher that sets up torch.distributed).
        log.warning("scaling.num_workers=%d but no process group: training on one worker in this process",
                    spec.scaling.num_workers)
    torch.manual_seed(spec.seed)  # initial weights and queue depend only on the seed

    if spec.optim.batch_size % dist.world_size():
        raise ValueError(f"optim.batch_size {spec.optim.batch_size} is not divisible by {dist.world_size()} workers")
    sets: dict[str, ImageSource | None] = {}

    def eval_sets() -> tuple[ImageSource | None, ImageSource | None]:
        """k-NN's memory bank and test split, built once and only where k-NN runs (rank 0)."""
        if not has_test_split(spec.data):
            return None, None
        if "train" not in sets:
            sets["train"] = job_source(spec.data, "train")
        if "test" not in sets:
            labelled = sets["train"].labelled  # type: ignore[union-attr]
            sets["test"] = job_source(spec.data, "test") if labelled else None
        return sets["train"], sets["test"]

    method = build_method(spec.method, spec.model, spec.loss, spec.optim.batch_size // dist.world_size(),
                          distributed=dist.is_distributed())
    method = prepare_method(method, runtime)
    if feed is None:
        sets["train"] = job_source(spec.data, "train")
        data = ViewFeed(spec, method, runtime, sets["train"])
    else:
        data = feed(spec, method, runtime)
    if spec.loss.queue_size > data.num_images:
        raise ValueError(
            f"loss.queue_size ({spec.loss.queue_size}) exceeds the {data.num_images} training images; "
            "the queue would hold keys of the very images it is contrasted with"
        )
    optimizer = build_optimizer(method, spec.optim)
    scheduler = build_scheduler(optimizer, spec.optim, data.steps_per_epoch)
    store = store or FolderStore(out / "checkpoints", spec.checkpoint.keep, spec.checkpoint.resume)

    state = RunState(out_dir=out, epochs=spec.optim.epochs, steps_per_epoch=data.steps_per_epoch)
    global_step = 0
    ckpt = store.latest()
    if ckpt is not None:
        state.start_epoch, global_step = restore_training_state(ckpt, method, optimizer, scheduler)
        state.final = ckpt.get("metrics", {})
        log.info("resumed at epoch %d, step %d", state.start_epoch, global_step)
        if folder is not None:
            state.history = folder.keep_until(state.start_epoch)
    elif folder is not None:
        folder.clear_records()
    cb.on_start(state)

    total_steps = spec.optim.epochs * data.steps_per_epoch
    every, last = spec.eval.knn_every, spec.optim.epochs
    for epoch in range(state.start_epoch, spec.optim.epochs):
        def on_log(record: dict[str, Any], _epoch: int = epoch) -> None:
            record = {"type": "step", "epoch": _epoch + 1, **record}
            if folder is not None:
                folder.append(record)
            cb.on_log(record)

        waited = [0.0]
        result = train_epoch(
            method, optimizer, scheduler, _timed(data.epoch(epoch), waited), runtime,
            global_step=global_step, total_steps=total_steps, momentum_base=spec.loss.momentum,
            momentum_schedule=spec.loss.momentum_schedule, log_every=spec.scaling.log_every, on_log=on_log,
        )
        global_step += result.steps
        done = epoch + 1
        record: dict[str, Any] = {
            "type": "epoch", "epoch": done, "step": global_step, "loss": result.loss, "lr": result.last_lr,
            "momentum": result.last_momentum, "instances_per_s": result.instances_per_s,
            "epoch_seconds": result.seconds, "input_seconds": waited[0], "skipped_files": data.skipped,
        }
        if main and ((every and done % every == 0) or done == last):
            # Rank 0 only: the other workers wait at the next collective (or the report barrier).
            evald = run_knn(method.query_encoder.backbone, spec, runtime, *eval_sets(),
                            linear=spec.eval.linear_probe and done == last)
            record.update(evald.as_metrics())
        state.history.append(record)
        due = main and (done % spec.checkpoint.every == 0 or done == last)

        def make_state(_record: dict[str, Any] = record, _done: int = done, _step: int = global_step) -> dict[str, Any]:
            return training_state(method, optimizer, scheduler, epoch=_done, global_step=_step,
                                  spec=spec.model_dump(mode="json"), metrics=_record)

        store.end_epoch(record, make_state if due else None, cb.on_checkpoint)
        if folder is not None:
            folder.append(record)
        cb.on_epoch(record, state)

    if main:
        state.final = state.history[-1] if state.history else state.final
    cb.on_end(state)
    if folder is not None:
        folder.write_encoder(method.query_encoder.backbone, spec, state.final)
        folder.write_summary(spec, state.final)
    return state


def _timed(batches: Iterator[tuple[torch.Tensor, ...]], waited: list[float]) -> Iterator[tuple[torch.Tensor, ...]]:
    """Adds to waited[0] the time the training loop spends waiting for each batch (reading,
    augmenting, streaming): the part of an epoch that is input, not compute."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        waited[0] += time.perf_counter() - start
        yield batch
