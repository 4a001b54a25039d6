"""Ray Data: read the images, decode them, make the views, stream them to the training workers.

Pipeline of a pretrain job (built on the driver, executed afresh every epoch):

    in-memory source (synthetic, CIFAR)      -> from_numpy, in blocks
    image files (local folder or s3://, gs://)  -> read_binary_files -> decode (tasks)
    Parquet (local or s3://, gs://)             -> read_parquet(image column) -> decode (tasks)
      (the training split only: an image folder's hold-out or test folder, a Parquet source's
       test folder, stay out of the stream wherever they are stored)
      (when the workers decode, `data.decode`, the tasks decode only the images their device
       decoder should not get)
      -> randomize_block_order
      -> views: `map_batches` on CPU, at most `scaling.data_workers` at a time, as tasks (default) or
         an actor pool (`scaling.data_compute`), or nothing when the training workers augment on
         their own device (`augment.device` gpu, or auto with GPUs or with `data.decode` gpu)
      -> streaming_split(num_workers, equal=True) -> `get_dataset_shard` in each worker

Where views are made and JPEGs decoded is `InputPlacement.for_ray_workers` (training.placement).
When the training workers decode (`data.decode` gpu, or auto with GPU workers that make the
views), the baseline JPEGs of an image folder or Parquet source travel as
their file bytes and each worker decodes its batch on its device as the in-process feed does
(`jpeg.decode_resize_batch`: nvJPEG on CUDA): decoding, the costliest part of the input, leaves
the CPUs.

The driver runs the stream inside a placement group that holds the job's data CPUs
(`resources.data_bundles`): its tasks and actors run only there, and training workers, the
job's own or another job's, can never take those CPUs.

Ray Data's streaming executor holds back upstream operators when downstream ones fall behind,
so memory stays bounded by its object-store budget, not by the dataset. Corrupt files are
dropped at decode time and counted by a small actor (their distinct paths, so a file seen again
in every epoch counts once); the count is the `skipped_files` metric.

Object stores are reached through pyarrow's filesystems, which take the endpoint and credentials
from the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION; GCS's own) of each process: the driver's, and every Ray node's (a cluster's
nodes are started with them; a job never carries them). `check_readable` and `check_writable`
try a location before a job uses it and turn the store's refusal into a `StorageError` that
names the location and the likely cause.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from leoclr_core.data import as_hwc_array
from leoclr_core.data.base import CorruptImageError, resize_square
from leoclr_core.data.imagefolder import EXTENSIONS, ImageFolder, decode_image, is_uri  # noqa: F401 - is_uri: also for embed
from leoclr_core.data.jpeg import collate_jpeg_or_pixels, decode_resize_batch, device_decodable
from leoclr_core.data.parquet import cell_bytes, parquet_split_paths
from leoclr_core.data.prefetch import Prefetcher
from leoclr_core.nn import collectives as dist
from leoclr_core.nn.methods import MomentumMethod
from leoclr_core.spec.models import PretrainSpec
from leoclr_core.training.engine import Runtime
from leoclr_core.training.feed import Feed, epoch_seed, job_source, resize_for_batching, view_maker
from leoclr_core.spec.placement import InputPlacement
from leoclr_core.views.batched import BatchedViews
from leoclr_core.views.transforms import make_view_transform

log = logging.getLogger(__name__)

BLOCK_ROWS = 512  # rows per block of an in-memory source: enough blocks to shuffle their order
IMAGE = "data"  # the image column (uint8 N, H, W, 3)


@ray.remote(num_cpus=0)
class SkipCounter:
    """Distinct unreadable files seen by the decode tasks of one job."""

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def add(self, paths: list[str]) -> None:
        self.paths.update(paths)

    def count(self) -> int:
        return len(self.paths)


# ---------------------------------------------------------------- object stores: tried before use
class StorageError(OSError):
    """A storage location a job needs cannot be used: which one, and the likely cause."""


# pyarrow's S3 errors read "... AWS Error <CODE> during <Operation> operation: <detail>".
_AWS_ERROR = re.compile(r"AWS Error (\w+) during (\w+) operation")
_DENIED = {"ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "INVALID_CLIENT_TOKEN_ID",
           "UNRECOGNIZED_CLIENT", "MISSING_AUTHENTICATION_TOKEN", "EXPIRED_TOKEN", "INVALID_SIGNATURE"}


def storage_problem(exc: BaseException) -> str:
    """What went wrong reaching an object store, in words (never the credentials: pyarrow's
    messages hold none, and this adds only the endpoint)."""
    text = str(exc)
    found = _AWS_ERROR.search(text)
    if found is None:
        return text.splitlines()[0] if text else type(exc).__name__
    code, operation = found.groups()
    if code in _DENIED:
        return f"access denied (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY?; {code} on {operation})"
    if code == "NETWORK_CONNECTION":
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"
        return f"cannot connect to {endpoint} (AWS_ENDPOINT_URL?)"
    if code == "NO_SUCH_BUCKET":
        return "no such bucket"
    return f"{code} on {operation}: {text[found.end():].lstrip(': ').splitlines()[0][:300]}"


def _filesystem(uri: str, what: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:  # an unknown scheme is ArrowInvalid, a ValueError
        raise StorageError(f"{what} {uri}: {storage_problem(exc)}") from None


def check_readable(uri: str, what: str) -> None:
    """StorageError unless `uri` (an object-store location) can be read; FileNotFoundError if
    nothing is there."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri, what)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"{what} {uri}: {storage_problem(exc)}") from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what} {uri}: nothing is stored there")


def check_writable(uri: str, what: str) -> None:
    """StorageError unless an object can be written and deleted under `uri` (Ray Train does both
    with a job's checkpoints): a small probe, removed at once."""
    fs, path = _filesystem(uri, what)
    probe = f"{path.rstrip('/')}/.leoclr-write-check-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"leoclr")
        fs.delete_file(probe)
    except OSError as exc:
        raise StorageError(f"{what} {uri}: {storage_problem(exc)}") from None


def list_image_files(uri: str) -> list[str]:
    """Image files under a local folder or an object-store prefix (pyarrow's filesystems)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    scheme = uri.split("://", 1)[0]
    found = sorted(
        f"{scheme}://{i.path}" for i in infos
        if i.type == pafs.FileType.File and Path(i.path).suffix.lower() in EXTENSIONS
        and not Path(i.path).name.startswith(".")
    )
    if not found:
        raise ValueError(f"no image files ({', '.join(EXTENSIONS)}) under {uri}")
    return found


def image_name(data: bytes, path: Any) -> str:
    """What an unreadable image is counted and reported as: its file path or, for a Parquet row,
    a digest of its bytes (so each counts once)."""
    return str(path) if path else "row sha1:" + hashlib.sha1(data).hexdigest()[:16]


def _paths(batch: dict[str, np.ndarray], column: str) -> Any:
    """The batch's file paths, or None for each row of a source without them (Parquet)."""
    return batch["path"] if "path" in batch else [None] * len(batch[column])


def _decoded(data: bytes, path: Any, size: int, bad: list[str]) -> torch.Tensor | None:
    """uint8 (3, size, size), or None for an unreadable image, named in `bad` (`image_name`)."""
    try:
        return resize_square(decode_image(io.BytesIO(data), draft_size=size), size)
    except CorruptImageError as exc:
        name = image_name(data, path)
        log.warning("skipping corrupt image %s: %s", name, exc)
        bad.append(name)
        return None


def decode_batch(batch: dict[str, np.ndarray], size: int, counter: Any | None,
                 column: str = "bytes") -> dict[str, np.ndarray]:
    """Bytes -> uint8 (N, size, size, 3); unreadable images are dropped and reported to `counter`."""
    images, bad = [], []
    for cell, path in zip(batch[column], _paths(batch, column)):
        image = _decoded(cell_bytes(cell), path, size, bad)
        if image is not None:
            images.append(image.permute(1, 2, 0).numpy())
    if bad and counter is not None:
        counter.add.remote(bad)
    if not images:
        return {IMAGE: np.zeros((0, size, size, 3), np.uint8)}
    return {IMAGE: np.stack(images)}


def keep_jpegs(batch: dict[str, np.ndarray], size: int, counter: Any | None, column: str = "bytes") -> pa.Table:
    """Image bytes -> rows for the training workers to decode: a JPEG their device decoder takes as
    it is (`device_decodable`) keeps its bytes (`jpeg` true); any other image is decoded and resized
    here and travels as the bytes of its uint8 (3, size, size) pixels. Unreadable images are dropped
    and reported to `counter`. `path` is the file's, or empty for a Parquet row. An explicit Arrow
    schema, so that an empty batch still concatenates."""
    blobs, is_jpeg, paths, bad = [], [], [], []
    for cell, path in zip(batch[column], _paths(batch, column)):
        data = cell_bytes(cell)
        if device_decodable(data):
            blobs.append(data)
            is_jpeg.append(True)
        else:
            image = _decoded(data, path, size, bad)
            if image is None:
                continue
            blobs.append(image.numpy().tobytes())
            is_jpeg.append(False)
        paths.append(str(path) if path is not None else "")
    if bad and counter is not None:
        counter.add.remote(bad)
    return pa.table({"blob": pa.array(blobs, pa.binary()), "jpeg": pa.array(is_jpeg, pa.bool_()),
                     "path": pa.array(paths, pa.string())})


def jpeg_batch(batch: dict[str, np.ndarray], size: int):
    """Rows of `keep_jpegs`, batched by Ray Data as NumPy, -> the `JpegBatch` that
    `decode_resize_batch` takes (the in-process feed's loader hands over the same)."""
    samples = []
    for blob, is_jpeg in zip(batch["blob"], batch["jpeg"]):
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)  # writable, pageable (see decode_resize_batch)
        samples.append((data if is_jpeg else data.view(3, size, size), 0, 0))
    return collate_jpeg_or_pixels(samples)[0]


class MakeViews:
    """A Ray Data actor: uint8 images in, normalised views out (float16 halves the bytes moved)."""

    def __init__(self, spec_json: dict[str, Any], threads: int = 1):
        torch.set_num_threads(max(1, threads))
        spec = PretrainSpec.model_validate(spec_json)
        aug, d = spec.augment, spec.data
        self.kinds = spec.view_kinds
        if aug.batched:
            self.batched = BatchedViews(aug, d.image_size, d.mean, d.std, kinds=self.kinds)
        else:
            self.batched = None
            self.transform = make_view_transform(spec.method, aug, d.image_size, d.mean, d.std, self.kinds)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.ascontiguousarray(batch[IMAGE])).permute(0, 3, 1, 2)
        if self.batched is not None:
            views = self.batched(images)
        else:
            per_image = [self.transform(im) for im in images]
            views = tuple(torch.stack([v[k] for v in per_image]) for k in range(len(self.kinds)))
        return {f"view{k}": v.to(torch.float16).numpy() for k, v in enumerate(views)}


_MAKERS: dict[str, MakeViews] = {}


def make_views(batch: dict[str, np.ndarray], spec_json: dict[str, Any], threads: int = 1) -> dict[str, np.ndarray]:
    """MakeViews as a task: one maker per spec, kept by the (reused) worker process."""
    key = json.dumps(spec_json, sort_keys=True)
    if key not in _MAKERS:
        _MAKERS.clear()
        _MAKERS[key] = MakeViews(spec_json, threads)
    return _MAKERS[key](batch)


def build_dataset(spec: PretrainSpec, counter: Any | None = None,
                  placement_group: PlacementGroup | None = None) -> tuple[ray.data.Dataset, int]:
    """The training stream of `spec` and the number of images it holds (before unreadable ones).
    With a placement group (the job's data CPUs), every task and actor of the stream runs in it."""
    d = spec.data
    placed = InputPlacement.for_ray_workers(spec)
    decode = keep_jpegs if placed.decode_on_device else decode_batch
    inside = {} if placement_group is None else {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group)}
    if d.source == "imagefolder":
        size = resize_for_batching(d)
        # The same train split as the in-process runner and k-NN's bank (hold-out, caps, seeds),
        # from a local folder or an object-store prefix (listed once; Ray Data reads the URIs).
        folder = ImageFolder(d.path, "train", labelled=False, num_images=d.num_images,  # type: ignore[arg-type]
                             num_test=d.num_test_images, seed=d.seed)
        paths = [str(p) for p in folder.files]
        ds = ray.data.read_binary_files(paths, include_paths=True, ray_remote_args=inside or None)
        ds = ds.map_batches(decode, fn_kwargs={"size": size, "counter": counter}, batch_size=64, **inside)
        n = len(paths)
    elif d.source == "parquet":
        size = resize_for_batching(d)
        where = str(parquet_split_paths(d.path)[0])  # type: ignore[arg-type]
        # The projection is pushed into the read.
        ds = ray.data.read_parquet(where, ray_remote_args=inside or None).select_columns([d.image_column])
        if d.num_images is not None:
            ds = ds.limit(d.num_images)
        n = ds.count()  # from the files' metadata
        ds = ds.map_batches(decode, fn_kwargs={"size": size, "counter": counter, "column": d.image_column},
                            batch_size=64, **inside)
    else:
        images = as_hwc_array(job_source(d, "train"))
        n = len(images)
        # Column "data", from_numpy's own name: a rename would add a task stage for nothing.
        ds = ray.data.from_numpy([images[i:i + BLOCK_ROWS] for i in range(0, n, BLOCK_ROWS)])
    ds = ds.randomize_block_order()
    if not placed.views_on_device:
        s = spec.scaling
        args = {"spec_json": spec.model_dump(mode="json"), "threads": int(s.data_cpus_per_worker)}
        common = {"num_cpus": s.data_cpus_per_worker, "batch_size": max(32, spec.optim.batch_size // s.num_workers),
                  **inside}
        if s.data_compute == "actors":
            ds = ds.map_batches(MakeViews, fn_constructor_kwargs=args,
                                compute=ray.data.ActorPoolStrategy(size=s.data_workers), **common)
        else:
            ds = ds.map_batches(make_views, fn_kwargs=args, compute=ray.data.TaskPoolStrategy(size=s.data_workers),
                                **common)
    return ds, n


class RayFeed(Feed):
    """This worker's shard of the stream, as batches of views on the training device."""

    def __init__(self, spec: PretrainSpec, method: MomentumMethod, runtime: Runtime, num_images: int,
                 counter: Any | None = None):
        self.spec, self.runtime, self.counter = spec, runtime, counter
        self.shard = ray.train.get_dataset_shard("train")
        world = dist.world_size()
        self.batch = spec.optim.batch_size // world
        self.num_images = num_images
        self.steps_per_epoch = (num_images // world) // self.batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_images} images make no full batch of {self.batch} per worker")
        self.kinds = spec.view_kinds
        placed = InputPlacement.for_ray_workers(spec)
        self.maker = view_maker(spec, self.kinds, runtime) if placed.views_on_device else None
        self.device_decode = placed.decode_on_device
        self.px = resize_for_batching(spec.data)
        self.skipped = 0

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        seed = epoch_seed(self.spec.seed, epoch, dist.rank())
        common = {"batch_size": self.batch, "drop_last": True, "prefetch_batches": 2,
                  "local_shuffle_buffer_size": 2 * self.batch, "local_shuffle_seed": seed}
        if self.device_decode:  # bytes of mixed lengths: NumPy object columns, not tensors
            batches = self.shard.iter_batches(batch_format="numpy", **common)
        else:
            batches = self.shard.iter_torch_batches(**common)
        gen = torch.Generator().manual_seed(seed) if self.maker else None  # CPU: see BatchedViews.params_for

        def prepare(batch) -> tuple[torch.Tensor, ...]:
            if self.device_decode:
                images, failed = decode_resize_batch(jpeg_batch(batch, self.px), self.px, self.runtime.device)
                if failed and self.counter is not None:
                    self.counter.add.remote([image_name(batch["blob"][i], batch["path"][i]) for i in failed])
            elif self.maker is not None:
                images = batch[IMAGE].to(self.runtime.device, non_blocking=True).permute(0, 3, 1, 2)
            else:
                return tuple(self.runtime.to_device(batch[f"view{k}"]).float() for k in range(len(self.kinds)))
            return tuple(self.runtime.to_device(v) for v in self.maker(images, generator=gen))  # type: ignore[misc]

        # On a GPU the next batches' views are made on a side stream while this one trains.
        yield from Prefetcher(batches, prepare, self.runtime.device)
        if self.counter is not None:
            self.skipped = int(ray.get(self.counter.count.remote()))
