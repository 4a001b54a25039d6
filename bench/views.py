"""How fast a batch of views is made on a device: each stage of ours, ours whole, and kornia's.

Why: the batched views (augment.py) are hand-written over torch and torchvision ops. kornia's
augmentation module does the same job with a well-kept library, so it is measured side by side,
on the same device, batch and sizes, and the faster one is kept (README: "Views on the GPU").
The stage rows say where the time of ours goes (JPEG decode, parameter sampling, crops and
resize, flip, colour jitter, grayscale, the two blur implementations, normalisation).

    python -m bench.views [SPEC] [--set k=v ...] [--device cuda|cpu] [--batch N]
        [--reps N] [--warmup N] [--impl NAME ...] [--no-stages] [--json PATH]

Every figure is milliseconds per batch (a median of `reps` timed calls, with one device
synchronisation around each) and instances/s (a batch of B images gives B instances, each with
all of its views). Imports torch, torchvision, and kornia when it is installed (`pip install
kornia`; the rows that need it say so otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torchvision.io import encode_jpeg
from torchvision.ops import roi_align

from leoclr_core.views.batched import (BatchedViews, blur_kernel_size, color_jitter, gaussian_blur, gaussian_blur_matmul,
                      grayscale)
from bench.engine import bench_images, device_name, resolve_spec_path
from leoclr_core.data.jpeg import collate_jpeg_or_pixels, decode_resize_batch
from leoclr_core.nn.methods import METHOD_REGISTRY
from leoclr_core.spec.models import AugmentSpec, PretrainSpec, SpecError, load_spec

# ours: float32, blur by batched matmul on accelerators; -conv-blur: grouped-conv blur; -fp16: the
# photometric ops in float16 (what a bf16 run on CUDA uses); -compiled: through torch.compile.
IMPLS = ("ours", "ours-conv-blur", "ours-fp16", "ours-fp16-compiled", "kornia")


def log(msg: str) -> None:
    print(f"[bench-views] {msg}", file=sys.stderr, flush=True)


def time_call(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of one call of `fn`, synchronising the device around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class KorniaViews:
    """The same views with kornia.augmentation: X resized whole, crops by RandomResizedCrop, then
    flip, colour jitter, grayscale, blur and normalisation over every view of the batch at once.

    Differences from ours, none of which changes the work done: kornia's ColorJitter applies its
    four ops in one order per call (ours, like torchvision, draws an order per sample), and its
    original view gets the photometric ops whatever `original_photometric` says.
    """

    def __init__(self, aug: AugmentSpec, size: int, mean: Sequence[float], std: Sequence[float],
                 kinds: Sequence[str]):
        import kornia.augmentation as K  # optional: the comparison is the only user

        self.kinds = tuple(kinds)
        self.crop = K.RandomResizedCrop((size, size), scale=aug.crop_scale, ratio=aug.crop_ratio)
        self.resize = K.Resize((size, size), antialias=True)
        k = blur_kernel_size(size)
        self.photometric = nn.Sequential(
            K.RandomHorizontalFlip(p=aug.flip_p),
            K.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue, p=aug.jitter_p),
            K.RandomGrayscale(p=aug.grayscale_p),
            K.RandomGaussianBlur((k, k), aug.blur_sigma, border_type="reflect", p=aug.blur_p),
            K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)),
        )

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.float().div_(255)
        parts = [self.resize(x) if kind == "original" else self.crop(x) for kind in self.kinds]
        return self.photometric(torch.cat(parts)).chunk(len(self.kinds))


def stage_calls(maker: BatchedViews, images: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each stage of `maker` alone, on inputs prepared once (so a stage's time is its own)."""
    aug, dev, b = maker.aug, images.device, images.shape[0]
    h, w, s = images.shape[2], images.shape[3], maker.size
    boxes, params = maker.params_for(b, h, w, None, dev)
    source = images.float().mul_(1 / 255)
    resampled = roi_align(source, boxes, (s, s), 1.0, -1, True).clamp_(0, 1)  # float32
    x = resampled.to(maker.dtype)
    k = maker.kernel_size
    mean, inv_std = maker._normaliser(dev)
    col = params.flip.view(-1, 1, 1, 1)
    return {
        "sample params (CPU, one copy)": lambda: maker.params_for(b, h, w, None, dev),
        "sample params (on the device)": lambda: maker.sample(b, h, w, None, dev),
        "uint8 -> float": lambda: images.float().mul_(1 / 255),
        "crops + resize (roi_align)": lambda: roi_align(source, boxes, (s, s), 1.0, -1, True).clamp_(0, 1),
        "to working dtype": lambda: resampled.to(maker.dtype, copy=True),
        "flip": lambda: torch.where(col, x.flip(-1), x),
        "colour jitter": lambda: color_jitter(x, params.factors, params.order, with_hue=aug.hue > 0),
        "grayscale": lambda: torch.where(params.grayscale.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x),
        "blur (grouped conv)": lambda: gaussian_blur(x, params.sigma, k, params.blur),
        "blur (batched matmul)": lambda: gaussian_blur_matmul(x, params.sigma, k, params.blur),
        "normalise": lambda: (x - mean).mul_(inv_std),
    }


def make_impl(name: str, spec: PretrainSpec, kinds: Sequence[str]) -> Callable[[torch.Tensor], object]:
    d, aug = spec.data, spec.augment
    if name == "kornia":
        return KorniaViews(aug, d.image_size, d.mean, d.std, kinds)
    blur = "conv" if name == "ours-conv-blur" else "auto"
    dtype = torch.float16 if "fp16" in name else torch.float32
    return BatchedViews(aug, d.image_size, d.mean, d.std, kinds, blur=blur, compile=name.endswith("compiled"),
                        dtype=dtype)


def run(spec: PretrainSpec, *, device: torch.device, batch: int, reps: int, warmup: int,
        impls: Sequence[str], stages: bool, jpeg: bool) -> dict:
    kinds = METHOD_REGISTRY[spec.method].view_kinds
    torch.manual_seed(spec.seed)
    log(f"rendering {batch} images of {spec.data.source}")
    source = bench_images(spec, batch)
    cpu_images = torch.stack([source[i][0] for i in range(batch)])
    images = cpu_images.to(device)
    _, _, h, w = images.shape
    rows: list[dict] = []

    def fail(group: str, name: str, error: str) -> None:
        rows.append({"group": group, "name": name, "error": error[:300]})
        log(f"{group:6s} {name:28s} failed: {error}")

    def add(group: str, name: str, fn: Callable[[], object], compiles: bool = False) -> None:
        try:
            if compiles:  # the first call compiles: timed apart, never part of the figure
                log(f"{name}: compiled in {time_call(fn, device, 1, 0) / 1e3:.1f} s")
            ms = time_call(fn, device, reps, warmup)
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            fail(group, name, f"{type(exc).__name__}: {exc}")
            return
        rows.append({"group": group, "name": name, "ms": ms, "inst_per_s": batch / ms * 1e3})
        log(f"{group:6s} {name:28s} {ms:9.2f} ms  {batch / ms * 1e3:12,.0f} instances/s")

    if jpeg:
        encoded, _, _ = collate_jpeg_or_pixels([(e, 0, 0) for e in encode_jpeg(list(cpu_images), quality=90)])
        add("input", "JPEG decode (batched)", lambda: decode_resize_batch(encoded, h, device))
    if stages:  # in the dtype training uses there: float16 on CUDA (under bf16 autocast), else float32
        ours = make_impl("ours-fp16" if device.type == "cuda" else "ours", spec, kinds)
        for name, fn in stage_calls(ours, images).items():
            add("stage", name, fn)
    for name in impls:
        try:
            maker = make_impl(name, spec, kinds)
        except ImportError as exc:
            fail("whole", name, f"not installed: {exc.name}")
            continue
        add("whole", name, lambda m=maker: m(images), compiles=name.endswith("compiled"))
    return {
        "config": spec.name, "method": spec.method, "views": list(kinds), "batch": batch,
        "source_px": [h, w], "view_px": spec.data.image_size, "device": device.type,
        "device_name": device_name(device), "torch": torch.__version__, "reps": reps, "rows": rows,
    }


def markdown(record: dict) -> str:
    lines = [f"Views of {record['batch']} images ({record['source_px'][0]} px -> {len(record['views'])} views "
             f"of {record['view_px']} px) on {record['device_name']}, torch {record['torch']}:", "",
             "| what | ms per batch | instances/s |", "|---|---|---|"]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} | - |")
        else:
            lines.append(f"| {r['group']}: {r['name']} | {r['ms']:.2f} | {r['inst_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.views", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=None, help="pretrain spec (default configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: optim.batch_size)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impl", action="append", choices=IMPLS, default=None,
                   help=f"whole implementations to time (default: all of {', '.join(IMPLS)})")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage rows")
    p.add_argument("--jpeg", action="store_true", help="also time a batched JPEG decode of the images")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.reps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        print("error: --reps and --batch must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    try:
        spec = load_spec(resolve_spec_path(args.spec), args.overrides)
        if not isinstance(spec, PretrainSpec):
            raise SpecError(f"the bench needs a pretrain spec, got a {spec.kind!r} spec")
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    record = run(spec, device=device, batch=args.batch or spec.optim.batch_size, reps=args.reps,
                 warmup=args.warmup, impls=args.impl or IMPLS, stages=not args.no_stages, jpeg=args.jpeg)
    print(markdown(record), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
