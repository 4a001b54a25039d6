"""This project's steps side by side with lightly's, same model, same machine, one run.

What a practitioner would write instead of using this service is lightly's MoCo-v2 recipe: its
`MoCoV2Transform` views made per sample by DataLoader workers, its `NTXentLoss` with a memory bank,
its momentum helpers and projection head. Four rows, one process, one backbone, image size, batch
size, precision and device:

    lightly-mocov2   lightly's MoCo-v2 step fed by its own transforms in DataLoader workers
    ours-mocov2      this project's MoCo-v2 step with its feed (batched views where the spec puts them)
    lightly-leoclr   the same lightly parts with LeOCLR's three views (the uncropped original by
                     torchvision per-sample transforms, the two crops by lightly's) and LeOCLR's loss
    ours-leoclr      this project's LeOCLR step, likewise

Each row: instances/s, the share of its timed wall time spent waiting for the next batch, the
encoder forwards per instance (counted by hooks on the backbones during a step, not declared),
its losses, and the CPU seconds the whole pipeline (this process and its loader workers) used in
the timed steps: instances per CPU-second is the figure that a shared machine's other work hardly
moves. A ratio of ours to a peer row is printed only when the two rows did the same work:
every setting in `settings` equal (the refusal names those that differ) and both losses finite
and decreasing. Differences the libraries force are listed under each row's `forced`, not compared.

The loss is judged over the timed steps only: by default the untimed warm-up fills the key queue
with this run's keys first (both libraries start it with random unit vectors, so the loss rises
while the queue fills and says nothing about learning until then); "decreasing" means the mean of
the last quarter of the timed steps is below that of the first quarter.

    python -m bench.peers [SPEC] [--set k=v ...] [--steps N] [--warmup W|auto] [--device cuda|cpu]
        [--data synthetic|jpeg] [--loader-workers K] [--rows ROW,...] [--json PATH]

Defaults: configs/demo.yaml (the tiny scale for a CPU), one loader worker per CPU core (what a user
would set), every row eager (lightly's recipe has no compiled path).
Needs `lightly` (the `bench` extra); everything else is what bench/engine.py needs.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torchvision
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bench.engine import bench_images, build_feed, device_name, load_bench_spec, log, view_batches
from leoclr_core.data import ImageSource
from leoclr_core.data.jpeg import EncodedImages
from leoclr_core.nn.methods import build_method
from leoclr_core.nn.model import build_backbone
from leoclr_core.spec.models import PretrainSpec, SpecError
from leoclr_core.training.engine import Runtime, build_optimizer, prepare_method, resolve_runtime, train_step
from leoclr_core.views.batched import blur_kernel_size

# Run in this order: each of ours right after its peer, so that a change in what else the machine
# runs moves a pair less than it moves the table.
ROWS = ("lightly-mocov2", "ours-mocov2", "lightly-leoclr", "ours-leoclr")
JPEG_QUALITY = 90


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- settings and the equal-work check
def setting_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The settings (dotted paths) in which two rows differ, with both values; empty when equal.
    A section only one row has (LeOCLR's original view) is named once."""
    out = []
    for k in sorted(set(a) | set(b)):
        path, x, y = f"{prefix}{k}", a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += setting_differences(x, y, path + ".")
        elif (x is None) != (y is None) and isinstance(x if x is not None else y, dict):
            out.append(f"{path} ({'only in the first row' if y is None else 'only in the second row'})")
        elif not _same(x, y):
            out.append(f"{path} ({_show(x)} vs {_show(y)})")
    return out


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_show(x) for x in v) + ")"
    return str(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
        return numbers and math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def judge_loss(losses: Sequence[float]) -> dict:
    """Finite everywhere, and the last quarter's mean below the first quarter's (over the timed steps)."""
    finite = all(math.isfinite(x) for x in losses)
    w = max(1, len(losses) // 4)
    first = sum(losses[:w]) / w if losses else float("nan")
    last = sum(losses[-w:]) / w if losses else float("nan")
    decreasing = finite and len(losses) >= 2 and last < first
    return {"finite": finite, "first_window": first, "last_window": last, "window": w,
            "decreasing": decreasing}


def ratio_or_refusal(ours: dict, peer: dict) -> dict:
    """Ours / peer instances per second, or why the two rows are not comparable."""
    reasons = setting_differences(ours["settings"], peer["settings"])
    for r in (ours, peer):
        if not r["loss"]["finite"]:
            reasons.append(f"{r['row']}: a non-finite loss")
        elif not r["loss"]["decreasing"]:
            reasons.append(f"{r['row']}: the loss did not decrease over the timed steps")
    out = {"ours": ours["row"], "peer": peer["row"], "ratio": None, "cpu_ratio": None,
           "refused": reasons or None}
    if not reasons and peer["inst_per_s"] > 0:
        out["ratio"] = ours["inst_per_s"] / peer["inst_per_s"]
        if ours.get("inst_per_cpu_s") and peer.get("inst_per_cpu_s"):
            out["cpu_ratio"] = ours["inst_per_cpu_s"] / peer["inst_per_cpu_s"]
    return out


# ---------------------------------------------------------------- augmentation, read back from the transforms
def _jitter(j: Any) -> dict:
    def half_width(r: Any) -> float:
        return 0.0 if r is None else float(r[1] - r[0]) / 2

    return {"brightness": half_width(j.brightness), "contrast": half_width(j.contrast),
            "saturation": half_width(j.saturation), "hue": half_width(j.hue)}


_NEUTRAL = {"jitter_p": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0,
            "grayscale_p": 0.0, "blur_p": 0.0, "blur_sigma": None, "flip_p": 0.0, "vflip_p": 0.0,
            "rotate_p": 0.0}


def describe_transform(compose: Any) -> dict:
    """The distributions a per-sample view pipeline draws from, read off its steps (torchvision's and
    lightly's), so that the check compares what runs, not what was meant. Unknown steps are named."""
    out: dict[str, Any] = dict(_NEUTRAL)
    from lightly.transforms.gaussian_blur import GaussianBlur
    from lightly.transforms.rotation import RandomRotate, RandomRotateDegrees
    for t in getattr(compose, "transforms", [compose]):
        name = type(t).__name__
        if isinstance(t, v2.RandomResizedCrop):
            out.update(geometry="random-resized-crop", crop_scale=tuple(t.scale), crop_ratio=tuple(t.ratio),
                       size=tuple(t.size))
        elif isinstance(t, v2.Resize):
            out.update(geometry="resize", size=tuple(t.size))
        elif isinstance(t, v2.RandomHorizontalFlip):
            out["flip_p"] = float(t.p)
        elif isinstance(t, v2.RandomVerticalFlip):
            out["vflip_p"] = float(t.p)
        elif isinstance(t, (RandomRotate, RandomRotateDegrees)):
            out["rotate_p"] = float(t.prob)
        elif isinstance(t, v2.RandomApply) and [type(x) for x in t.transforms] == [v2.ColorJitter]:
            out.update(jitter_p=float(t.p), **_jitter(t.transforms[0]))
        elif isinstance(t, v2.RandomGrayscale):
            out["grayscale_p"] = float(t.p)
        elif isinstance(t, GaussianBlur):
            out.update(blur_p=float(t.prob), blur_sigma=tuple(float(s) for s in t.sigmas))
        elif isinstance(t, v2.Normalize):
            out.update(mean=tuple(t.mean), std=tuple(t.std))
        elif name not in ("ToTensor", "ToImage", "ToDtype", "Compose"):
            out.setdefault("other", []).append(name)
    return out


def ours_augmentation(spec: PretrainSpec, kinds: Sequence[str]) -> dict:
    """The same description for this project's views, from the spec they are built from (the batched
    and per-sample paths draw from the same distributions: tests/unit guard that)."""
    a, d = spec.augment, spec.data
    crop = {**_NEUTRAL, "geometry": "random-resized-crop", "crop_scale": tuple(a.crop_scale),
            "crop_ratio": tuple(a.crop_ratio), "size": (d.image_size, d.image_size), "flip_p": a.flip_p,
            "jitter_p": a.jitter_p, "brightness": a.brightness, "contrast": a.contrast,
            "saturation": a.saturation, "hue": a.hue, "grayscale_p": a.grayscale_p,
            "blur_p": a.blur_p, "blur_sigma": tuple(a.blur_sigma), "mean": tuple(d.mean), "std": tuple(d.std)}
    out = {"crop": crop}
    if "original" in kinds:
        original = {**_NEUTRAL, "geometry": "resize", "size": (d.image_size, d.image_size),
                    "mean": tuple(d.mean), "std": tuple(d.std)}
        if a.original_flip:
            original["flip_p"] = a.flip_p
        if a.original_photometric:
            original.update({k: crop[k] for k in ("jitter_p", "brightness", "contrast", "saturation", "hue",
                                                  "grayscale_p", "blur_p", "blur_sigma")})
        out["original"] = original
    return out


# ---------------------------------------------------------------- lightly's rows
def lightly_views(spec: PretrainSpec, method: str) -> Callable:
    """lightly's per-sample transform for a method: MoCoV2Transform's two crops, or for LeOCLR the
    uncropped original (torchvision steps, lightly's blur) followed by two of its crops."""
    from lightly.transforms import MoCoV2Transform
    from lightly.transforms.gaussian_blur import GaussianBlur
    from lightly.transforms.multi_view_transform import MultiViewTransform
    from lightly.transforms.torchvision_v2_compatibility import ToTensor

    a, d = spec.augment, spec.data
    if a.crop_scale[1] != 1.0 or not all(math.isclose(x, y) for x, y in zip(a.crop_ratio, (3 / 4, 4 / 3))):
        # lightly fixes both; the check would refuse every ratio, so say it now.
        log(f"note: lightly's crop has scale (min, 1.0) and ratio (3/4, 4/3); the spec asks "
            f"{a.crop_scale} and {a.crop_ratio}")
    normalize = {"mean": list(d.mean), "std": list(d.std)}
    moco = MoCoV2Transform(
        input_size=d.image_size, cj_prob=a.jitter_p, cj_strength=1.0, cj_bright=a.brightness,
        cj_contrast=a.contrast, cj_sat=a.saturation, cj_hue=a.hue, min_scale=a.crop_scale[0],
        random_gray_scale=a.grayscale_p, gaussian_blur=a.blur_p, sigmas=tuple(a.blur_sigma),
        hf_prob=a.flip_p, normalize=normalize)
    if method == "mocov2":
        return moco
    crop = moco.transforms[0]
    steps: list[Any] = [v2.Resize((d.image_size, d.image_size), antialias=True)]
    if a.original_flip:
        steps.append(v2.RandomHorizontalFlip(a.flip_p))
    if a.original_photometric:
        jitter = v2.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue)
        steps += [v2.RandomApply([jitter], p=a.jitter_p),
                  v2.RandomGrayscale(a.grayscale_p), GaussianBlur(sigmas=tuple(a.blur_sigma), prob=a.blur_p)]
    steps += [ToTensor(), v2.Normalize(list(d.mean), list(d.std))]
    return MultiViewTransform([v2.Compose(steps), crop, crop])


def lightly_augmentation(transform: Any, method: str) -> dict:
    # lightly's view transforms wrap a Compose in `.transform`; a torchvision Compose is one already.
    views = [t if isinstance(t, v2.Transform) else t.transform for t in transform.transforms]
    if method == "mocov2":
        return {"crop": describe_transform(views[0])}
    return {"original": describe_transform(views[0]), "crop": describe_transform(views[1])}


class PILViews(Dataset):
    """What a lightly user's dataset does: a PIL image per sample, the views made from it here (in
    the DataLoader's workers)."""

    def __init__(self, source: ImageSource, transform: Callable):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        image = self.source[i][0]
        return self.transform(TF.to_pil_image(image))


class LightlyMoCo(nn.Module):
    """lightly's MoCo model as its example writes it: backbone + MoCoProjectionHead, momentum copies
    with gradients off. The backbone is this project's (same architecture as ours)."""

    def __init__(self, spec: PretrainSpec):
        super().__init__()
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        m = spec.model
        self.backbone, feat_dim = build_backbone(m)
        self.projection_head = MoCoProjectionHead(feat_dim, m.proj_hidden_dim, m.proj_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    @torch.no_grad()
    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        from lightly.models.utils import batch_shuffle, batch_unshuffle

        # MoCo's shuffle-BN on one device: lightly's batch_shuffle around the key forward.
        x, shuffle = batch_shuffle(x)
        key = self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1))
        return batch_unshuffle(key, shuffle).detach()

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)


def lightly_step(model: LightlyMoCo, criterion: nn.Module, optimizer: torch.optim.Optimizer, method: str,
                 momentum: float, runtime: Runtime) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
    def step(views: Sequence[torch.Tensor]) -> torch.Tensor:
        views = [runtime.to_device(v) for v in views]
        model.momentum_update(momentum)  # where lightly's MoCo example puts it: before the forwards
        with runtime.autocast():
            if method == "mocov2":
                x_query, x_key = views
                query, key = model(x_query), model.forward_momentum(x_key)
            else:
                x, x1, x2 = views
                q = model(x)
                k1, k2 = model.forward_momentum(torch.cat([x1, x2])).chunk(2)
                # LeOCLR's (l(q, k1) + l(q, k2)) / 2 as one NTXentLoss call: the mean over the 2B rows
                # is that average, both terms see the same bank, and the bank then takes k1 and k2
                # (two calls would make k1 a negative of the second term, its own positive's pair).
                query, key = torch.cat([q, q]), torch.cat([k1, k2])
        # In float32, as ours: a bf16 softmax over a large bank loses the positive's contribution.
        loss = criterion(query.float(), key.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


# ---------------------------------------------------------------- measuring a row
def pipeline_cpu_s() -> float | None:
    """CPU seconds used so far by this process (every thread) and its live children (the loader's
    workers), from /proc; None where there is no /proc. Unlike wall time, it hardly moves with what
    else a shared machine runs."""
    me, total = os.getpid(), 0
    try:
        tick = os.sysconf("SC_CLK_TCK")
        stats = list(Path("/proc").glob("[0-9]*/stat"))
    except (OSError, ValueError):
        return None
    for stat in stats:
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # a process that ended meanwhile
        if int(stat.parent.name) == me or int(fields[1]) == me:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick if stats else None


@dataclass
class Measured:
    seconds: float
    wait_s: float
    cpu_s: float | None
    losses: list[float]
    forwards: dict[str, float] = field(default_factory=dict)


def count_forwards(encoders: dict[str, nn.Module]) -> tuple[dict[str, int], Callable[[], None]]:
    """Samples through each encoder's backbone while the hooks are on: the work actually done."""
    counts = {name: 0 for name in encoders}
    handles = []
    for name, module in encoders.items():
        def hook(_mod, args, name=name):
            counts[name] += int(args[0].shape[0])
        handles.append(module.register_forward_pre_hook(hook))
    return counts, lambda: [h.remove() for h in handles]


def measure_row(step: Callable[[Any], torch.Tensor], batches: Iterator, warmup: int, steps: int, batch: int,
                device: torch.device, encoders: dict[str, nn.Module]) -> Measured:
    """`warmup` untimed steps (the first with the forward-counting hooks on), then `steps` timed ones
    between two device synchronisations; time blocked on the next batch is the input wait."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    counts, remove = count_forwards(encoders)
    forwards: dict[str, float] = {}
    losses: list[torch.Tensor] = []
    wait, cpu0 = 0.0, None
    start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start, wait, losses, cpu0 = time.perf_counter(), 0.0, [], pipeline_cpu_s()
        t0 = time.perf_counter()
        views = next(batches)
        wait += time.perf_counter() - t0
        losses.append(step(views))
        if i == 0:
            remove()
            forwards = {k: v / batch for k, v in counts.items()}
    sync()
    seconds = time.perf_counter() - start
    cpu1 = pipeline_cpu_s()
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return Measured(seconds, wait, cpu, [float(x) for x in losses], forwards)


def queue_fill_steps(spec: PretrainSpec, method: str) -> int:
    """Steps until the key queue holds only this run's keys (LeOCLR enqueues both crops' keys)."""
    per_step = spec.optim.batch_size * (2 if method == "leoclr" and spec.loss.enqueue == "both" else 1)
    return math.ceil(spec.loss.queue_size / per_step)


def common_settings(spec: PretrainSpec, runtime: Runtime, workers: int, data: str) -> dict:
    m = spec.model
    return {
        "model": {"backbone": m.backbone, "cifar_stem": m.cifar_stem,
                  "width": m.width if m.backbone == "tiny" else None,
                  "proj_hidden_dim": m.proj_hidden_dim, "proj_dim": m.proj_dim},
        "image_size": spec.data.image_size, "batch_size": spec.optim.batch_size,
        "device": runtime.device.type,
        "precision": "bf16" if runtime.autocast_dtype == torch.bfloat16 else "fp32",
        "channels_last": runtime.channels_last, "loader_workers": workers, "data": data,
        "queue_size": spec.loss.queue_size, "temperature": spec.loss.temperature,
        "key_momentum": spec.loss.momentum,
        "optimizer": {"name": "SGD", "lr": spec.optim.lr, "momentum": spec.optim.momentum,
                      "weight_decay": spec.optim.weight_decay},
    }


def forced_differences(spec: PretrainSpec, lightly_row: bool) -> list[str]:
    """What differs between the libraries' rows and cannot be set equal (not part of the check)."""
    if not lightly_row:
        return []
    size = spec.data.image_size
    return [
        f"blur: lightly's GaussianBlur is PIL's ImageFilter.GaussianBlur(radius=sigma) (box-filter "
        f"approximation, untruncated); ours a separable Gaussian truncated to {blur_kernel_size(size)} px "
        "(about 10% of the view side, as MoCo-v2)",
        "photometric ops (jitter, grayscale, blur) run on the PIL uint8 crop in lightly, on float32 in "
        "ours; jitter's four ops are in a random order per call in both (torchvision's ColorJitter)",
        f"key batch norm: lightly's rows shuffle the key batch (batch_shuffle) and normalise it whole; "
        f"ours shuffles it and splits it into {math.gcd(spec.optim.batch_size, spec.loss.bn_splits)} "
        "batch-norm groups (lightly's SplitBatchNorm cannot take channels_last activations)",
        "the memory bank takes the keys inside the loss call (before the optimiser step; the same keys), "
        "and the EMA update comes before the forwards (lightly's example), ours after the step",
        "optimiser: torch.optim.SGD with defaults (foreach on CUDA); ours the fused SGD on CUDA",
    ]


def run_row(row: str, spec: PretrainSpec, *, device: torch.device, steps: int, warmup: int | None, data: str,
            workers: int, max_images: int, prefetch: int) -> dict:
    library, method = row.split("-", 1)
    spec = spec.model_copy(update={"method": method})
    torch.manual_seed(spec.seed)
    runtime = resolve_runtime(spec.scaling, device)
    b = spec.optim.batch_size
    fill = queue_fill_steps(spec, method)
    warm = fill + 2 if warmup is None else warmup
    count = max(b, min(max_images, (warm + steps) * b))
    images = bench_images(spec, count)
    kinds = ("original", "crop", "crop") if method == "leoclr" else ("crop", "crop")
    settings = common_settings(spec, runtime, workers, data)
    settings["views"] = ",".join(kinds)
    if library == "lightly":
        from lightly.loss import NTXentLoss

        model = LightlyMoCo(spec).to(runtime.device)
        if runtime.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        bank = (spec.loss.queue_size, spec.model.proj_dim)
        criterion = NTXentLoss(temperature=spec.loss.temperature, memory_bank_size=bank).to(runtime.device)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=spec.optim.lr,
                                    momentum=spec.optim.momentum, weight_decay=spec.optim.weight_decay)
        transform = lightly_views(spec, method)
        source = EncodedImages(images, JPEG_QUALITY, decode=True) if data == "jpeg" else images
        dataset = PILViews(source, transform)
        sampler = RandomSampler(dataset, num_samples=(warm + steps) * b,
                                generator=torch.Generator().manual_seed(spec.seed))
        loader = DataLoader(dataset, batch_size=b, sampler=sampler, drop_last=True, num_workers=workers,
                            pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None)
        batches: Iterator = iter(loader)
        step = lightly_step(model, criterion, optimizer, method, spec.loss.momentum, runtime)
        encoders = {"query": model.backbone, "key": model.backbone_momentum}
        settings["augmentation"] = lightly_augmentation(transform, method)
        input_path = ("per-sample views (lightly/torchvision on PIL) in DataLoader workers"
                      + (", JPEG decoded in the workers" if data == "jpeg" else ""))
    else:
        method_ = prepare_method(build_method(method, spec.model, spec.loss, b), runtime)
        method_.train()
        optimizer = build_optimizer(method_, spec.optim)
        feed = build_feed(spec, method_, runtime, images, jpeg=data == "jpeg")
        batches = view_batches(feed, spec, runtime, workers, warm + steps, prefetch)
        m = spec.loss.momentum
        step = lambda views: train_step(method_, optimizer, views, m, runtime)  # noqa: E731
        encoders = {"query": method_.query_encoder.backbone, "key": method_.key.backbone}
        settings["augmentation"] = ours_augmentation(spec, kinds)
        input_path = feed.describe(device)
    log(f"{row}: {input_path}, {workers} loader workers: {warm} warm-up (queue fills in {fill}) "
        f"+ {steps} timed steps")
    r = measure_row(step, batches, warm, steps, b, device, encoders)
    # The loader's workers must be gone before the next row: left prefetching, they take its cores.
    for _ in batches:
        pass
    if hasattr(batches, "close"):
        batches.close()
    settings["forwards_per_instance"] = r.forwards
    rate = steps * b / r.seconds if r.seconds > 0 else 0.0
    loss = judge_loss(r.losses)
    log(f"{row}: {rate:,.1f} instances/s, input wait {r.wait_s / r.seconds:.0%}, loss "
        f"{loss['first_window']:.3f} -> {loss['last_window']:.3f}")
    return {
        "row": row, "library": library, "method": method, "input_path": input_path,
        "inst_per_s": rate, "inst_per_s_per_core": rate / cpu_cores() if device.type == "cpu" else None,
        "input_wait_share": r.wait_s / r.seconds if r.seconds > 0 else 0.0,
        "cpu_s": r.cpu_s, "inst_per_cpu_s": steps * b / r.cpu_s if r.cpu_s else None,
        "seconds": r.seconds, "steps": steps, "warmup": warm, "queue_fill_steps": fill,
        "losses": r.losses, "loss": loss, "settings": settings,
        "forced": forced_differences(spec, library == "lightly"),
    }


def run_peers(spec: PretrainSpec, *, rows: Sequence[str] = ROWS, device: torch.device, steps: int,
              warmup: int | None, data: str, workers: int, max_images: int = 4096, prefetch: int = 2) -> dict:
    load_before = os.getloadavg()
    records = [run_row(r, spec, device=device, steps=steps, warmup=warmup, data=data, workers=workers,
                       max_images=max_images, prefetch=prefetch) for r in rows]
    ours = [r for r in records if r["library"] == "ours"]
    peers = [r for r in records if r["library"] != "ours"]
    import lightly

    return {
        "config": spec.name, "device": device.type, "device_name": device_name(device),
        "cpu_cores": cpu_cores(), "loadavg_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "rows": records, "ratios": [ratio_or_refusal(o, p) for o in ours for p in peers],
        "torch": torch.__version__, "torchvision": torchvision.__version__, "lightly": lightly.__version__,
        "python": sys.version.split()[0], "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.model_dump(mode="json"),
    }


# ---------------------------------------------------------------- tables
def rows_table(result: dict) -> str:
    cpu = result["device"] == "cpu"
    head = ["row", "input path", "instances/s"] + (["per CPU core", "per CPU-second"] if cpu else []) + \
        ["input wait", "forwards/instance (query + key)", "loss first -> last quarter", "finite, decreasing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in result["rows"]:
        f, loss = r["settings"]["forwards_per_instance"], r["loss"]
        cells = [r["row"], r["input_path"], f"{r['inst_per_s']:,.0f}"]
        if cpu:
            per_cpu_s = r.get("inst_per_cpu_s")
            cells += [f"{r['inst_per_s_per_core']:,.0f}", f"{per_cpu_s:,.0f}" if per_cpu_s else "-"]
        cells += [f"{r['input_wait_share']:.0%}", f"{f.get('query', 0):g} + {f.get('key', 0):g}",
                  f"{loss['first_window']:.3f} -> {loss['last_window']:.3f}",
                  ("yes" if loss["finite"] else "NO") + ", " + ("yes" if loss["decreasing"] else "NO")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ratios_table(result: dict) -> str:
    lines = ["| ours | peer | ours / peer, instances/s | ours / peer, instances per CPU-second |",
             "|---|---|---|---|"]
    for x in result["ratios"]:
        if x["ratio"] is None:
            lines.append(f"| {x['ours']} | {x['peer']} | refused: {'; '.join(x['refused'])} | |")
            continue
        cpu = f"{x['cpu_ratio']:.2f}" if x.get("cpu_ratio") is not None else "-"
        lines.append(f"| {x['ours']} | {x['peer']} | {x['ratio']:.2f} | {cpu} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=None, help="pretrain spec (default configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row")
    p.add_argument("--warmup", default="auto",
                   help="untimed steps per row (auto: until the key queue holds only this run's keys, + 2)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--data", choices=("synthetic", "jpeg"), default="synthetic",
                   help="jpeg: images JPEG-encoded once, decoded where each row's pipeline decodes them")
    p.add_argument("--loader-workers", type=int, default=None, help="default: one per CPU core")
    p.add_argument("--max-images", type=int, default=4096, help="distinct images prepared (then cycled)")
    p.add_argument("--prefetch", type=int, default=2,
                   help="GPU, our rows: batches prepared ahead on a side stream")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--json", type=Path, default=None, help="write the raw records here")
    args = p.parse_args(argv)
    # load_bench_spec reads it: every row runs eager (lightly's recipe has no compiled path)
    args.compile = False
    return args


def check_args(args: argparse.Namespace) -> str | None:
    if args.steps < 4:
        return "--steps must be >= 4 (the loss is judged on the first and last quarter)"
    if args.warmup != "auto" and (not str(args.warmup).isdigit() or int(args.warmup) < 1):
        return "--warmup must be auto or an integer >= 1 (the first warm-up step counts the forwards)"
    if args.loader_workers is not None and args.loader_workers < 0:
        return "--loader-workers must be >= 0"
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        return f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        import lightly  # noqa: F401
    except ImportError:
        print("error: lightly is not installed (pip install 'lightly>=1.5,<1.7')", file=sys.stderr)
        return 2
    try:
        spec = load_bench_spec(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = cpu_cores() if args.loader_workers is None else args.loader_workers
    result = run_peers(spec, rows=tuple(args.rows.split(",")), device=device, steps=args.steps,
                       warmup=None if args.warmup == "auto" else int(args.warmup), data=args.data,
                       workers=workers, max_images=args.max_images, prefetch=args.prefetch)
    result["command"] = "python -m bench.peers " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{result['config']} on {result['device_name']}, {workers} loader workers, {result['date']}\n")
    print(rows_table(result))
    print(ratios_table(result), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
