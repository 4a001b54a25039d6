"""A pretrain job's input on the training device: images in, batches of views out, epoch by epoch.

`ViewFeed` is the in-process feed (a DataLoader over the job's source); the Ray layer's feed
(`distributed.data.RayFeed`) reads a Ray Data shard instead, and the GPU benchmark drives a
`ViewFeed` with its own sampler. Where views are made and JPEGs decoded is `InputPlacement`'s
decision; this module only carries it out.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from leoclr_core.data import ImageSource, build_source, collate_images
from leoclr_core.data.jpeg import collate_jpeg_or_pixels, decode_resize_batch
from leoclr_core.data.prefetch import Prefetcher
from leoclr_core.nn import collectives as dist
from leoclr_core.nn.methods import MomentumMethod
from leoclr_core.spec.models import DataSpec, PretrainSpec
from leoclr_core.training.engine import Runtime
from leoclr_core.spec.placement import InputPlacement
from leoclr_core.views.batched import BatchedViews
from leoclr_core.views.transforms import make_view_transform

Views = tuple[torch.Tensor, ...]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Views and sampling of an epoch depend only on (seed, epoch, rank): a resumed epoch replays."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1)


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


def view_maker(spec: PretrainSpec, kinds: tuple[str, ...], runtime: Runtime,
               compile: bool | None = None) -> BatchedViews:
    """The on-device view maker of every feed: in `runtime.view_dtype`, compiled when
    `runtime.compile_views` (or as `compile` says)."""
    d = spec.data
    return BatchedViews(spec.augment, d.image_size, d.mean, d.std, kinds=kinds, dtype=runtime.view_dtype,
                        compile=runtime.compile_views if compile is None else compile)


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


class Feed:
    """What the epoch loop needs of its data: batches of views on the device, epoch by epoch."""

    num_images: int
    steps_per_epoch: int
    skipped: int

    def epoch(self, epoch: int) -> Iterator[Views]:  # pragma: no cover - interface
        raise NotImplementedError


class ViewFeed(Feed):
    """Turns a data source into batches of views on the training device, one epoch at a time.

    Views per sample (torchvision v2 in the loader's workers), or, with `views_on_device`, uint8
    images sent to the device where `BatchedViews` makes all views of a batch at once; with
    `decode_on_device` the source's JPEGs (`source.encoded_copy()`) travel encoded and are
    decoded there. `placement`: default the rule for this process's device.
    """

    def __init__(self, spec: PretrainSpec, method: MomentumMethod, runtime: Runtime, source: ImageSource,
                 placement: InputPlacement | None = None, *, compile_views: bool | None = None):
        self.runtime, self.spec, self.source = runtime, spec, source
        self.placement = placement or InputPlacement.for_process(spec, runtime.device.type)
        self.maker = (view_maker(spec, spec.view_kinds, runtime, compile_views)
                      if self.placement.views_on_device else None)
        self.dataset: Dataset
        if self.placement.decode_on_device:
            self.dataset, self.collate = source.encoded_copy(), collate_jpeg_or_pixels  # type: ignore[attr-defined]
        elif self.maker is not None:
            self.dataset, self.collate = source, collate_images
        else:
            d = spec.data
            transform = make_view_transform(spec.method, spec.augment, d.image_size, d.mean, d.std, spec.view_kinds)
            self.dataset, self.collate = ViewDataset(source, transform), collate_views
        self.per_worker_batch = spec.optim.batch_size // dist.world_size()
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

    @property
    def pin_memory(self) -> bool:
        # Not for JPEG bytes: nvJPEG may read pinned input after decode returns, when the pinned
        # block could already be refilled with a later batch.
        return self.runtime.device.type == "cuda" and not self.placement.decode_on_device

    def prepare(self, item: Any, generator: torch.Generator | None = None) -> Views:
        """A loader batch -> its views on the device (decoded and made there when placed there)."""
        payload, _labels, skipped = item
        self.skipped += skipped
        if self.placement.decode_on_device:
            payload, failed = decode_resize_batch(payload, self.source.fixed_size, self.runtime.device)
            self.skipped += len(failed)
        elif self.maker is not None:
            payload = payload.to(self.runtime.device, non_blocking=True)
        if self.maker is not None:
            payload = self.maker(payload, generator=generator)
        return tuple(self.runtime.to_device(v) for v in payload)

    def epoch(self, epoch: int) -> Iterator[Views]:
        seed = epoch_seed(self.spec.seed, epoch, dist.rank())
        torch.manual_seed(seed)
        self.sampler.set_epoch(epoch)
        loader = DataLoader(
            self.dataset, batch_size=self.per_worker_batch, sampler=self.sampler, drop_last=True,
            num_workers=self.spec.scaling.loader_workers, collate_fn=self.collate, pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(seed),
        )
        # View parameters are drawn on the CPU (BatchedViews.params_for): the same views on any device.
        gen = torch.Generator().manual_seed(seed) if self.maker is not None else None
        # On a GPU the next batches' views are made on a side stream while this one trains.
        yield from Prefetcher(loader, lambda item: self.prepare(item, gen), self.runtime.device)
