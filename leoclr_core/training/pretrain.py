"""A whole pretraining run in one process: data, views, method, epochs, k-NN, checkpoints, outputs.

The Ray layer runs this same loop inside each worker; here it runs without Ray (`--local`, tests,
the GPU benchmark box). Outputs in the run folder: `checkpoints/epoch-NNNN.pt`, `metrics.jsonl`
(one JSON record per log window and per epoch), `encoder.pt` and `summary.json`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from leoclr_core.nn import collectives as dist
from leoclr_core.views.batched import BatchedViews
from leoclr_core.training.checkpoint import (
    atomic_save,
    latest_checkpoint,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from leoclr_core.data import ImageSource, build_source, collate_images
from leoclr_core.data.jpeg import collate_jpeg_or_pixels, decode_resize_batch
from leoclr_core.training.engine import (
    Runtime,
    build_optimizer,
    build_scheduler,
    prepare_method,
    resolve_runtime,
    train_epoch,
)
from leoclr_core.evaluation.probes import EvalResult, evaluate_backbone
from leoclr_core.nn.methods import MomentumMethod, build_method
from leoclr_core.nn.model import build_backbone
from leoclr_core.data.prefetch import Prefetcher
from leoclr_core.spec.models import ENCODED_SOURCES, DataSpec, ModelSpec, PretrainSpec
from leoclr_core.views.transforms import make_view_transform

log = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Views and sampling of an epoch depend only on (seed, epoch, rank): a resumed epoch replays."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1)


class ViewDataset(Dataset):
    """Per-sample views on the CPU (DataLoader workers): (views, label, skipped)."""

    def __init__(self, source: ImageSource, transform: Callable):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        image, label, skipped = self.source[i]
        return self.transform(image), label, skipped


def collate_views(batch):
    views = tuple(torch.stack([b[0][v] for b in batch]) for v in range(len(batch[0][0])))
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return views, labels, sum(b[2] for b in batch)


def augments_batched(spec: PretrainSpec, runtime: Runtime) -> bool:
    """Views batched on the training device (`augment.device` gpu, or auto on CUDA or with
    `data.decode` gpu, or `batched`), or else per sample in loader workers."""
    aug = spec.augment
    if aug.device == "gpu" or aug.batched:
        return True
    # decode gpu puts the images on the device undecoded: the views can only be made there
    return aug.device == "auto" and (runtime.device.type == "cuda" or wants_device_decode(spec))


def wants_device_decode(spec: PretrainSpec) -> bool:
    """`data.decode` asks, in so many words, for encoded images decoded on the training device."""
    return spec.data.source in ENCODED_SOURCES and spec.data.decode == "gpu"


def batched_views(spec: PretrainSpec, kinds: tuple[str, ...], runtime: Runtime,
                  compile: bool | None = None) -> BatchedViews:
    """The on-device view maker of every feed: in `runtime.view_dtype`, compiled when
    `runtime.compile_views` (or as `compile` says)."""
    d = spec.data
    return BatchedViews(spec.augment, d.image_size, d.mean, d.std, kinds=kinds, dtype=runtime.view_dtype,
                        compile=runtime.compile_views if compile is None else compile)


def device_decodes(spec: PretrainSpec, views_on_device: bool, gpu: bool) -> bool:
    """The `data.decode` rule, for a training device that makes the views (`views_on_device`) and
    is a GPU (`gpu`): JPEGs of an image folder or Parquet source are decoded there with gpu, or
    with auto on a GPU. The in-process feed and Ray's workers each say how their device is set."""
    d = spec.data
    if d.source not in ENCODED_SOURCES or d.decode == "cpu" or not views_on_device:
        return False
    return d.decode == "gpu" or gpu


def decodes_on_device(spec: PretrainSpec, runtime: Runtime) -> bool:
    """The in-process feed's JPEGs decoded on the training device rather than in loader workers."""
    return device_decodes(spec, augments_batched(spec, runtime), runtime.device.type == "cuda")


def resize_for_batching(data: DataSpec) -> int:
    """Square size file images are decoded to, so that batches stack (views, feature extraction)."""
    return max(data.image_size, round(data.image_size * 8 / 7))


def job_source(data: DataSpec, split: str) -> ImageSource:
    """A job's train or test source; file images are decoded to a fixed square size so that
    batches stack (synthetic scenes already have one)."""
    if data.source == "synthetic-objects":
        return build_source(data, split)  # type: ignore[arg-type]
    size = resize_for_batching(data) if split == "train" else data.image_size
    return build_source(data, split, resize_to=size)  # type: ignore[arg-type]


class Feed:
    """What the epoch loop needs of its data: batches of views on the device, epoch by epoch."""

    num_images: int
    steps_per_epoch: int
    skipped: int

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:  # pragma: no cover - interface
        raise NotImplementedError


class ViewFeed(Feed):
    """Turns a data source into batches of views on the training device, one epoch at a time.

    `augment.device` = cpu: torchvision v2 per sample in the loader; gpu (or `batched` on CPU):
    uint8 images go to the device and `BatchedViews` makes all views of a batch at once. The JPEGs
    of an image folder or Parquet source then go there still encoded and are decoded there
    (`decodes_on_device`).
    """

    def __init__(self, spec: PretrainSpec, method: MomentumMethod, runtime: Runtime, source: ImageSource):
        aug, data = spec.augment, spec.data
        self.batched = augments_batched(spec, runtime)
        self.runtime, self.spec, self.source = runtime, spec, source
        self.per_worker_batch = spec.optim.batch_size // dist.world_size()
        self.device_decode = decodes_on_device(spec, runtime)
        if self.batched:
            self.maker = batched_views(spec, method.view_kinds, runtime)
            self.dataset: Dataset = source
            self.collate = collate_images
            if self.device_decode:
                self.dataset = source.encoded_copy()  # type: ignore[attr-defined]
                self.collate = collate_jpeg_or_pixels
        else:
            transform = make_view_transform(spec.method, aug, data.image_size, data.mean, data.std)
            self.dataset = ViewDataset(source, transform)
            self.collate = collate_views
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True,
            seed=spec.seed, drop_last=True,
        )
        self.steps_per_epoch = len(self.sampler) // self.per_worker_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(source)} images make no full batch of {self.per_worker_batch} per worker"
            )
        self.skipped = 0
        self.num_images = len(source)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        seed = epoch_seed(self.spec.seed, epoch, dist.rank())
        torch.manual_seed(seed)
        self.sampler.set_epoch(epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.per_worker_batch,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.spec.scaling.loader_workers,
            collate_fn=self.collate,
            # Not for JPEG bytes: nvJPEG may read pinned input after decode returns, when the
            # pinned block could already be refilled with a later batch.
            pin_memory=self.runtime.device.type == "cuda" and not self.device_decode,
            generator=torch.Generator().manual_seed(seed),
        )
        # View parameters are drawn on the CPU (BatchedViews.params_for): the same views on any device.
        gen = torch.Generator().manual_seed(seed) if self.batched else None

        def prepare(item) -> tuple[torch.Tensor, ...]:
            payload, _labels, skipped = item
            self.skipped += skipped
            if self.device_decode:
                payload, failed = decode_resize_batch(payload, self.source.resize_to, self.runtime.device)
                self.skipped += len(failed)
            elif self.batched:
                payload = payload.to(self.runtime.device, non_blocking=True)
            if self.batched:
                payload = self.maker(payload, generator=gen)
            return tuple(self.runtime.to_device(v) for v in payload)

        # On a GPU the next batches' views are made on a side stream while this one trains.
        yield from Prefetcher(loader, prepare, self.runtime.device)


@dataclass
class RunState:
    """What the caller of `pretrain` sees during and after the run."""

    out_dir: Path
    epochs: int
    steps_per_epoch: int
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


class Callbacks:
    """Hooks for progress displays and trackers; every method is optional."""

    def on_start(self, state: RunState) -> None: ...
    def on_log(self, record: dict[str, Any]) -> None: ...
    def on_epoch(self, record: dict[str, Any], state: RunState) -> None: ...
    def on_checkpoint(self, path: Path, epoch: int) -> None: ...


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, completed_epochs: int) -> None:
    """On resume, drop records of epochs after the checkpoint: they will be run again."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("epoch", 0) <= completed_epochs
    ]
    path.write_text("".join(line + "\n" for line in kept))


def _epoch_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("type") == "epoch"]


def has_test_split(data: DataSpec) -> bool:
    """Whether this process can build a labelled test split for k-NN: none for an object-store URI
    (readable on Ray only), for a Parquet source that is not pre-split, or with num_test_images 0."""
    if data.num_test_images == 0 or (data.path and "://" in data.path):
        return False
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


def save_encoder(path: Path, backbone: nn.Module, model: ModelSpec, extra: dict[str, Any] | None = None) -> Path:
    """The exported encoder: backbone weights plus the model section needed to rebuild it."""
    return atomic_save(
        {"model": model.model_dump(mode="json"), "backbone": backbone.state_dict(), **(extra or {})}, path
    )


def load_backbone(path: str | Path) -> tuple[nn.Module, ModelSpec]:
    """A backbone from `encoder.pt`, a checkpoint file, or a run folder (its newest checkpoint)."""
    p = Path(path)
    if p.is_dir() and (p / "encoder.pt").is_file():
        p = p / "encoder.pt"
    elif p.is_dir() and (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name == "encoder.pt" and p.is_file():
        state = torch.load(p, map_location="cpu", weights_only=False)
    else:
        state = load_checkpoint(p)
    return backbone_from_state(state, str(path))


def backbone_from_state(state: dict[str, Any], where: str = "the state") -> tuple[nn.Module, ModelSpec]:
    """The query backbone of an exported encoder or of a training checkpoint's state."""
    if "backbone" in state:
        model, weights = ModelSpec(**state["model"]), state["backbone"]
    elif "query" in state:
        model = ModelSpec(**state["spec"]["model"])
        weights = {k.removeprefix("backbone."): v for k, v in state["query"].items() if k.startswith("backbone.")}
    else:
        raise ValueError(f"{where} holds neither an exported encoder nor a training checkpoint")
    backbone, _ = build_backbone(model)
    backbone.load_state_dict(weights)
    return backbone.eval(), model


class CheckpointStore:
    """Where a run's checkpoints live: the newest one to resume from, and where each epoch ends.

    `end_epoch` is called on every rank after every epoch (a Ray Train store reports there, which
    every worker must do); `state` builds the checkpoint when one is due, on rank 0 only.
    """

    def latest(self) -> dict[str, Any] | None:
        return None

    def end_epoch(self, record: dict[str, Any], state: Callable[[], dict[str, Any]] | None) -> Path | None:
        return None


class FolderStore(CheckpointStore):
    """`epoch-NNNN.pt` files in one folder, the newest `keep` kept (the in-process runner's store)."""

    def __init__(self, directory: Path, keep: int, resume: bool = True):
        self.directory, self.keep, self.resume = Path(directory), keep, resume

    def latest(self) -> dict[str, Any] | None:
        found = latest_checkpoint(self.directory) if self.resume else None
        if found is None:
            return None
        log.info("resuming from %s", found)
        return load_checkpoint(found)

    def end_epoch(self, record: dict[str, Any], state: Callable[[], dict[str, Any]] | None) -> Path | None:
        return save_checkpoint(state(), self.directory, self.keep) if state is not None else None


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
    metrics_path = out / "metrics.jsonl"
    main = dist.rank() == 0
    writes = main and write_outputs
    if writes:
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(spec.model_dump_json(indent=2))
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
        if writes:
            _truncate_metrics(metrics_path, state.start_epoch)
            state.history = _epoch_records(metrics_path)
    elif writes and metrics_path.exists():
        metrics_path.unlink()
    cb.on_start(state)

    total_steps = spec.optim.epochs * data.steps_per_epoch
    every, last = spec.eval.knn_every, spec.optim.epochs
    for epoch in range(state.start_epoch, spec.optim.epochs):
        def on_log(record: dict[str, Any], _epoch: int = epoch) -> None:
            record = {"type": "step", "epoch": _epoch + 1, **record}
            if writes:
                _append_jsonl(metrics_path, record)
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

        saved = store.end_epoch(record, make_state if due else None)
        if saved is not None:
            cb.on_checkpoint(saved, done)
        if writes:
            _append_jsonl(metrics_path, record)
        cb.on_epoch(record, state)

    if main:
        state.final = state.history[-1] if state.history else state.final
    if writes:
        save_encoder(out / "encoder.pt", method.query_encoder.backbone, spec.model,
                     {"method": spec.method, "metrics": state.final, "data": spec.data.model_dump(mode="json")})
        write_summary(out, spec, state.final)
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


def write_summary(out: Path, spec: PretrainSpec, final: dict[str, Any], **extra: Any) -> Path:
    summary = {"name": spec.name, "method": spec.method, "epochs": spec.optim.epochs,
               "final": final, "finished_at": time.time(), **extra}
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return path
