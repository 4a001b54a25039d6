"""An embed job on Ray Data: an encoder applied to a whole collection, written as a Parquet dataset.

    image files (local folder or s3://, gs://) -> read_binary_files -> decode, resize (tasks)
    Parquet (local or s3://, gs://)            -> one item per row group -> read, decode, resize (tasks)
    built-in sources (synthetic, CIFAR)         -> in blocks from the driver -> resize (tasks)
      -> map_batches(Embedder): an actor pool of `replicas` model replicas, each holding the
         encoder from the first batch to the last
      -> write_parquet into a staging folder -> which then replaces the output folder

Preprocessing is the evaluation's (evaluation.probes): the whole image, square-resized to
`data.image_size`, in [0, 1]; the encoder normalises it (an `ImageEncoder` from the registry
carries its statistics; a checkpoint's backbone is wrapped with `data.mean` / `data.std`).

Streaming: every stage is a Ray Data operator, so memory is bounded by its object-store budget,
not by the collection (nothing is materialised; reads of image files and Parquet row groups happen
in the tasks). The encoder is resolved once, on the driver, and shared through the object store:
every replica embeds with the same version even if an alias moves while the job runs.

Unreadable images are dropped at decode time, logged, and listed (the result's `skipped`).
A re-run of the same job (same name and output) writes everything again into `<output>.partial`
and then replaces the output, so rows never appear twice. Progress (images done, images/s, ETA)
goes to the job's MLflow run under the contract's progress keys, as a pretrain job's does.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
import torch
from mlflow.exceptions import MlflowException

from leoclr_core import contract, tracking
from leoclr_core.data import as_hwc_array, build_source
from leoclr_core.data.base import CorruptImageError, resize_square
from leoclr_core.data.imagefolder import _class_dirs, decode_image, list_images, split_roots
from leoclr_core.data.parquet import cell_bytes, parquet_split_paths
from leoclr_core.distributed.data import is_uri, list_image_files
from leoclr_core.nn.model import ImageEncoder
from leoclr_core.settings import CoreSettings, core_settings
from leoclr_core.spec.models import EmbedSpec, ScalingSpec
from leoclr_core.spec.resources import embed_cpus
from leoclr_core.training.checkpoint import load_backbone
from leoclr_core.training.engine import resolve_runtime

log = logging.getLogger(__name__)

DECODE_ROWS = 64  # images per decode task call
BLOCK_ROWS = 512  # images per block of a built-in source sent from the driver
ROWS_PER_FILE = 8192  # rows buffered per output file: fewer, larger files than one per batch
PIXELS = "pixels"  # the decoded column: uint8 (N, size, size, 3)
NO_LABEL = -1  # a label unknown while the rows travel; null in the output
SKIPPED_IN_RESULT = 1000  # names listed in the result; all of them are in the run's artifact
SHEET_QUERIES, SHEET_K = 4, 8


@ray.remote(num_cpus=0)
class Tally:
    """Images embedded so far and the distinct unreadable ones, reported by the tasks and replicas."""

    def __init__(self) -> None:
        self.done = 0
        self.skipped: set[str] = set()

    def embedded(self, n: int) -> None:
        self.done += n

    def skip(self, names: list[str]) -> None:
        self.skipped.update(names)

    def read(self) -> tuple[int, list[str]]:
        return self.done, sorted(self.skipped)


# ---------------------------------------------------------------- preprocessing (decode tasks)
def _rows(ids: list[str], labels: list[int], images: list[np.ndarray], size: int) -> dict[str, np.ndarray]:
    return {contract.EMBED_ID: np.array(ids, dtype=object), contract.EMBED_LABEL: np.array(labels, np.int64),
            PIXELS: np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)}


def _decode(data: bytes, name: str, size: int, bad: list[str]) -> np.ndarray | None:
    """uint8 (size, size, 3), as an evaluation's source decodes and resizes; None when unreadable."""
    try:
        image = resize_square(decode_image(io.BytesIO(data), draft_size=size), size)
    except CorruptImageError as exc:
        log.warning("skipping corrupt image %s: %s", name, exc)
        bad.append(name)
        return None
    return image.permute(1, 2, 0).numpy()


def decode_files(batch: dict[str, np.ndarray], root: str, classes: list[str] | None, depth: int, size: int,
                 tally: Any) -> dict[str, np.ndarray]:
    """Files of `read_binary_files` -> rows; the id is the path under `root`, the label the class
    folder `depth` levels below it (an index into `classes`)."""
    ids, labels, images, bad = [], [], [], []
    known = {c: i for i, c in enumerate(classes or [])}
    for data, path in zip(batch["bytes"], batch["path"]):
        rel = str(path).removeprefix(root).lstrip("/")
        image = _decode(bytes(data), rel, size, bad)
        if image is None:
            continue
        parts = rel.split("/")
        ids.append(rel)
        labels.append(known.get(parts[depth], NO_LABEL) if len(parts) > depth + 1 else NO_LABEL)
        images.append(image)
    if bad:  # listed before these rows exist, so the final list is complete
        ray.get(tally.skip.remote(bad))
    return _rows(ids, labels, images, size)


def decode_row_groups(batch: dict[str, np.ndarray], image_column: str, label_column: str | None,
                      classes: list[str] | None, size: int, tally: Any) -> Iterator[dict[str, np.ndarray]]:
    """Row groups of Parquet files (one item each: file, group, first row, rows) -> rows, read
    `DECODE_ROWS` at a time so that a large row group never sits whole in a task."""
    import pyarrow.parquet as pq

    known = {c: i for i, c in enumerate(classes or [])}
    for where, group, first, count in zip(batch["file"], batch["group"], batch["first"], batch["rows"]):
        fs, path = pafs.FileSystem.from_uri(str(where))
        columns = [image_column] + ([label_column] if classes is not None else [])
        with fs.open_input_file(path) as f:
            n = int(first)
            left = int(count)
            for part in pq.ParquetFile(f).iter_batches(batch_size=DECODE_ROWS, row_groups=[int(group)],
                                                        columns=columns):
                if left <= 0:
                    break
                part = part.slice(0, left)
                cells = part.column(image_column).to_pylist()
                raw_labels = part.column(label_column).to_pylist() if classes is not None else [None] * len(cells)
                ids, labels, images, bad = [], [], [], []
                for cell, label in zip(cells, raw_labels):
                    data, row = cell_bytes(cell), f"row-{n}"
                    n += 1
                    image = _decode(data, row, size, bad)
                    if image is not None:
                        ids.append(row)
                        labels.append(NO_LABEL if label is None else known.get(str(label), NO_LABEL))
                        images.append(image)
                left -= len(cells)
                if bad:
                    ray.get(tally.skip.remote(bad))
                yield _rows(ids, labels, images, size)


def resize_pixels(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Rows of a built-in source (uint8 HWC at the source's size) -> `size` x `size`."""
    images = torch.from_numpy(_writable(batch[PIXELS])).permute(0, 3, 1, 2)
    resized = resize_square(images, size).permute(0, 2, 3, 1).contiguous().numpy()
    return {contract.EMBED_ID: batch[contract.EMBED_ID], contract.EMBED_LABEL: batch[contract.EMBED_LABEL],
            PIXELS: resized}


def _writable(array: np.ndarray) -> np.ndarray:
    """Ray Data hands batches over read-only (zero-copy); torch wants to own writable memory."""
    return np.require(array, requirements=["C_CONTIGUOUS", "WRITEABLE"])


# ---------------------------------------------------------------- the model replicas
class Embedder:
    """A Ray Data actor: the encoder, loaded once from the object store; rows in, embeddings out."""

    def __init__(self, encoder: list[Any], scaling: dict[str, Any], dim: int, tally: Any):
        sc = ScalingSpec.model_validate(scaling)
        torch.set_num_threads(max(1, int(sc.cpus_per_worker)))
        self.runtime = resolve_runtime(sc)
        self.encoder = ray.get(encoder[0]).to(self.runtime.device).eval()
        if self.runtime.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        self.dim, self.tally = dim, tally

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        x = torch.from_numpy(_writable(batch[PIXELS])).to(self.runtime.device, non_blocking=True)
        x = self.runtime.to_device(x.permute(0, 3, 1, 2).float().div_(255.0))
        with self.runtime.autocast():
            vectors = self.encoder(x).float().cpu().numpy()
        labels = batch[contract.EMBED_LABEL]
        self.tally.embedded.remote(len(vectors))
        return pa.table({
            contract.EMBED_ID: pa.array([str(i) for i in batch[contract.EMBED_ID]], pa.string()),
            contract.EMBED_LABEL: pa.array(labels, pa.int64(), mask=labels == NO_LABEL),
            contract.EMBED_VECTOR: pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), self.dim),
        })


# ---------------------------------------------------------------- the job
@dataclass
class EmbedRun:
    """What an embed job leaves: its dataset, its MLflow run, and the images it could not read."""

    run_id: str
    output: str
    encoder: str  # the encoder URI written into the files (an alias resolved to its version)
    images: int  # rows written
    total: int  # images in the source, unreadable ones included
    dim: int
    seconds: float
    skipped: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def result(self, spec: EmbedSpec) -> dict[str, Any]:
        return {"name": spec.name, "mlflow_run_id": self.run_id, "output": self.output, "encoder": self.encoder,
                "images": self.images, "total_images": self.total, "dim": self.dim, "replicas": spec.replicas,
                "seconds": round(self.seconds, 1), "images_per_s": round(self.images_per_s, 1),
                "skipped_files": len(self.skipped), "skipped": self.skipped[:SKIPPED_IN_RESULT]}


def absolute(location: str) -> str:
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def load_job_encoder(spec: EmbedSpec, settings: CoreSettings) -> tuple[ImageEncoder, str]:
    """The encoder (an `ImageEncoder`: [0, 1] images in) and the URI that names exactly it."""
    ref = spec.encoder
    if ref.model_uri:
        # The alias is read once: the version loaded is the one named, even if the alias moves now.
        try:
            version = tracking.resolve_version(ref.model_uri, settings)
        except MlflowException:  # no such model or alias: load_encoder says so, naming the URI
            version = None
        uri = f"models:/{version[0]}/{version[1]}" if version else ref.model_uri
        return tracking.load_encoder(uri, settings), uri
    backbone, _ = load_backbone(ref.checkpoint)  # type: ignore[arg-type]
    d = spec.data
    return ImageEncoder(backbone, d.mean, d.std, d.image_size).eval(), absolute(ref.checkpoint)  # type: ignore[arg-type]


def build_rows(spec: EmbedSpec, tally: Any) -> tuple[ray.data.Dataset, list[str]]:
    """The stream of preprocessed rows and the ids of every image in source order (unreadable
    ones included). Decode tasks: at most `scaling.data_workers` at a time."""
    d, sc = spec.data, spec.scaling
    size = d.image_size
    tasks = {"compute": ray.data.TaskPoolStrategy(size=sc.data_workers), "num_cpus": sc.data_cpus_per_worker}
    if d.source == "imagefolder":
        root = absolute(d.path)  # type: ignore[arg-type]
        if is_uri(root):
            paths = list_image_files(root)
            key = root.split("://", 1)[1].rstrip("/")  # read_binary_files names objects without the scheme
        else:
            paths = [str(p) for p in list_images(Path(root))]
            key = root
            if not paths:
                raise ValueError(f"no image files under {root}")
        if d.num_images is not None:
            paths = paths[: d.num_images]
        ids = [p.split("://", 1)[-1].removeprefix(key).lstrip("/") for p in paths]
        classes, depth = folder_classes(root, ids) if d.labelled else (None, 0)
        ds = ray.data.read_binary_files(paths, include_paths=True)
        ds = ds.map_batches(decode_files, fn_kwargs={"root": key, "classes": classes, "depth": depth, "size": size,
                                                     "tally": tally}, batch_size=DECODE_ROWS, **tasks)
        return ds, ids
    if d.source == "parquet":
        items, classes = parquet_row_groups(spec)
        total = sum(i["rows"] for i in items)
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(decode_row_groups, fn_kwargs={"image_column": d.image_column,
                                                          "label_column": d.label_column, "classes": classes,
                                                          "size": size, "tally": tally}, batch_size=1, **tasks)
        return ds, [f"row-{n}" for n in range(total)]
    source = build_source(d, "train")
    images = as_hwc_array(source)
    labels = source.targets if source.labelled else np.full(len(images), NO_LABEL, np.int64)
    ids = [f"row-{n}" for n in range(len(images))]
    ds = ray.data.from_blocks([
        pa.table({contract.EMBED_ID: ids[i:i + BLOCK_ROWS], contract.EMBED_LABEL: labels[i:i + BLOCK_ROWS],
                  PIXELS: _tensor_column(images[i:i + BLOCK_ROWS])})
        for i in range(0, len(images), BLOCK_ROWS)])
    if images.shape[1] != size:
        ds = ds.map_batches(resize_pixels, fn_kwargs={"size": size}, batch_size=DECODE_ROWS, **tasks)
    return ds, ids


def _tensor_column(images: np.ndarray) -> pa.Array:
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(images)


def folder_classes(root: str, ids: list[str]) -> tuple[list[str] | None, int]:
    """Class names of an image folder (the training code's: sorted class folders, those of `train/`
    when the tree is split into train and val/test) and how deep under the root an id names its class."""
    if not is_uri(root):
        base = Path(root)
        roots = split_roots(base)
        names = _class_dirs(roots[0] if roots else base)
        return (names or None), (1 if roots else 0)
    tops = {i.split("/")[0] for i in ids if "/" in i}
    if "train" in tops and tops & {"val", "test"}:
        return sorted({i.split("/")[1] for i in ids if i.startswith("train/") and i.count("/") >= 2}) or None, 1
    return sorted(tops) or None, 0


def parquet_row_groups(spec: EmbedSpec) -> tuple[list[dict[str, Any]], list[str] | None]:
    """One item per row group of the source's training files, in the order the files are read as a
    dataset (so `row-<n>` is the n-th row there), up to `data.num_images` rows; and the class names
    (sorted labels as text, as the training code indexes them), None when unlabelled."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    d = spec.data
    where = str(parquet_split_paths(d.path if is_uri(d.path) else absolute(d.path))[0])  # type: ignore[arg-type]
    dataset = pads.dataset(where, format="parquet")
    scheme = f"{where.split('://', 1)[0]}://" if is_uri(where) else ""  # the dataset names objects without it
    if d.image_column not in dataset.schema.names:
        raise ValueError(f"parquet source '{where}' has no column {d.image_column!r} (columns: {dataset.schema.names})")
    cap = d.num_images if d.num_images is not None else float("inf")
    items: list[dict[str, Any]] = []
    first = 0
    for path in dataset.files:
        with dataset.filesystem.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            rows = int(min(meta.row_group(g).num_rows, cap - first))
            if rows <= 0:
                break
            items.append({"file": scheme + path, "group": g, "first": first, "rows": rows})
            first += rows
    if not items:
        raise ValueError(f"parquet source '{where}' holds no rows")
    classes = None
    if d.labelled and d.label_column and d.label_column in dataset.schema.names:
        values = dataset.to_table(columns=[d.label_column]).column(0).to_pylist()
        classes = sorted({str(v) for v in values if v is not None})
    return items, classes


def output_schema(spec: EmbedSpec, encoder_uri: str, dim: int) -> pa.Schema:
    """The contract's columns, with the encoder and the data spec in every file's metadata."""
    meta = {contract.EMBED_META_ENCODER: encoder_uri,
            contract.EMBED_META_DATA: json.dumps(spec.data.model_dump(mode="json"))}
    return pa.schema([(contract.EMBED_ID, pa.string()), (contract.EMBED_LABEL, pa.int64()),
                      (contract.EMBED_VECTOR, pa.list_(pa.float32(), dim))], metadata=meta)


def written_rows(location: str) -> int:
    """Rows of a Parquet dataset, from its files' footers (0 when nothing was written)."""
    import pyarrow.dataset as pads

    fs, path = pafs.FileSystem.from_uri(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return 0
    return pads.dataset(path, filesystem=fs, format="parquet").count_rows()


def replace_output(staging: str, output: str) -> None:
    """Move the staged dataset to `output`, removing what a previous run left there. A folder that
    is not an embeddings dataset (files other than Parquet with the contract's metadata) is never
    removed: the job fails, naming it."""
    import pyarrow.parquet as pq

    fs, out = pafs.FileSystem.from_uri(output)
    _, staged = pafs.FileSystem.from_uri(staging)
    if fs.get_file_info(out).type != pafs.FileType.NotFound:
        found = [i for i in fs.get_file_info(pafs.FileSelector(out, recursive=True)) if i.type == pafs.FileType.File]
        foreign = [i.path for i in found if not i.path.endswith(".parquet")]
        if not foreign and found:
            with fs.open_input_file(found[0].path) as f:
                if contract.EMBED_META_ENCODER.encode() not in (pq.read_schema(f).metadata or {}):
                    foreign = [found[0].path]
        if foreign:
            raise ValueError(f"output {output} holds files that are not an embeddings dataset (e.g. {foreign[0]}); "
                             "it is left as it is: choose another output_dir")
        fs.delete_dir(out)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(staged, out)
        return
    # Object stores have no folders to rename: file by file.
    fs.create_dir(out)
    for info in fs.get_file_info(pafs.FileSelector(staged, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.move(info.path, f"{out}/{info.path[len(staged):].lstrip('/')}")
    fs.delete_dir(staged)


class _Progress:
    """Polls the tally while the stream runs and logs progress to the MLflow run (and `on_progress`)."""

    def __init__(self, tally: Any, run_id: str, total: int, settings: CoreSettings,
                 on_progress: Callable[[int, int], None] | None):
        self.tally, self.run_id, self.total, self.on_progress = tally, run_id, total, on_progress
        self.client = tracking.client(settings)
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="leoclr-embed-progress", daemon=True)

    def report(self) -> tuple[int, list[str]]:
        done, skipped = ray.get(self.tally.read.remote())
        elapsed = time.monotonic() - self.started
        values: dict[str, float] = {contract.M_STEP: done, contract.M_TOTAL: self.total}
        if done:
            rate = done / elapsed
            values[contract.M_IPS] = rate
            values[contract.M_ETA] = max(0, self.total - len(skipped) - done) / rate
        try:
            tracking.log_metrics(self.client, self.run_id, values, step=done)
        except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not stop the job
            log.warning("MLflow progress failed for run %s: %s", self.run_id, exc)
        if self.on_progress is not None:
            self.on_progress(done, self.total)
        return done, skipped

    def _run(self) -> None:
        while not self.stop.wait(2.0):
            try:
                self.report()
            except Exception as exc:  # noqa: BLE001 - a progress read must not stop the job
                log.debug("embed progress poll failed: %s", exc)

    def __enter__(self) -> "_Progress":
        self.report()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def run_embed(spec: EmbedSpec, *, settings: CoreSettings | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> EmbedRun:
    """Run `spec` on the connected Ray cluster (`ray.init` done by the caller); blocks until the
    dataset is in place. The job's MLflow run gets the output's URI (TAG_EMBEDDINGS), progress,
    the totals, the list of unreadable images and a neighbour sheet of a few fixed queries."""
    from ray.data import DataContext, SaveMode

    s = settings or core_settings()
    started = time.perf_counter()
    output = absolute(spec.output(s.storage_path or str(s.home)))
    encoder, encoder_uri = load_job_encoder(spec, s)
    with torch.no_grad():
        dim = int(encoder(torch.zeros(1, 3, spec.data.image_size, spec.data.image_size)).shape[1])
    run_id = tracking.start_job_run(spec, output, settings=s, extra_tags={
        contract.TAG_EMBEDDINGS: output, contract.TAG_ENCODER: spec.encoder.model_uri or encoder_uri})
    outcome = "FAILED"
    try:
        # On the driver's node: a worker node that dies would take the tally along (see pretrain._fit).
        tally = Tally.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
        rows, ids = build_rows(spec, tally)
        sc = spec.scaling
        embedded = rows.map_batches(
            Embedder, fn_constructor_kwargs={"encoder": [ray.put(encoder)], "scaling": sc.model_dump(mode="json"),
                                             "dim": dim, "tally": tally},
            batch_size=spec.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=spec.replicas),
            num_cpus=sc.cpus_per_worker, num_gpus=sc.gpus_per_worker if sc.use_gpu else 0)
        staging = f"{output}.partial"
        options = DataContext.get_current().execution_options
        limits = options.resource_limits
        # Plan the stream for what the job asked for (spec.resources), not for the whole cluster.
        options.resource_limits = limits.copy(cpu=embed_cpus(spec),
                                              gpu=spec.replicas * sc.gpus_per_worker if sc.use_gpu else 0)
        try:
            with _Progress(tally, run_id, len(ids), s, on_progress) as progress:
                embedded.write_parquet(staging, schema=output_schema(spec, encoder_uri, dim),
                                       min_rows_per_file=ROWS_PER_FILE, mode=SaveMode.OVERWRITE)
        finally:
            options.resource_limits = limits  # this process's Ray Data context outlives the job
        _, skipped = progress.report()
        done = written_rows(staging)
        if done == 0:
            raise ValueError(f"none of the {len(ids)} images of {spec.data.source} {spec.data.path or ''} could be "
                             "read: nothing to embed")
        replace_output(staging, output)
        run = EmbedRun(run_id=run_id, output=output, encoder=encoder_uri, images=done, total=len(ids), dim=dim,
                       seconds=time.perf_counter() - started, skipped=skipped)
        _record(run, ids, s)
        outcome = "FINISHED"
        return run
    except KeyboardInterrupt:  # Ctrl-C, or the service cancelling the job (its driver gets SIGTERM)
        outcome = "KILLED"
        raise
    finally:
        tracking.end_run(run_id, outcome, settings=s)


def _record(run: EmbedRun, ids: list[str], s: CoreSettings) -> None:
    """The totals, the unreadable images and a neighbour sheet on the job's MLflow run."""
    from leoclr_core.evaluation.neighbours import fixed_queries, sheet_for_queries

    c = tracking.client(s)
    tracking.log_metrics(c, run.run_id, {"images": run.images, "images_per_s": run.images_per_s,
                                         "skipped_files": len(run.skipped)}, step=0)
    # The last progress from the files themselves (the replicas' counts are fire and forget).
    tracking.log_metrics(c, run.run_id, {contract.M_STEP: run.images, contract.M_TOTAL: run.total,
                                         contract.M_IPS: run.images_per_s, contract.M_ETA: 0}, step=run.images)
    if run.skipped:
        c.log_dict(run.run_id, {"skipped": run.skipped}, "leoclr/skipped.json")
    bad = set(run.skipped)
    kept = [i for i in ids if i not in bad]
    queries = [kept[i] for i in fixed_queries(len(kept), SHEET_QUERIES)]
    with tempfile.TemporaryDirectory() as tmp:
        sheet = sheet_for_queries(run.output, queries, SHEET_K, Path(tmp) / "neighbours.png")
        tracking.log_artifact_file(run.run_id, sheet, "neighbours", settings=s)
