"""Training throughput of one config: compute-only vs end-to-end, measured in the same run.

Why both: the compute-only rate (random views already on the device) is what the model and
optimiser can do; the end-to-end rate (loader -> host-to-device copy -> JPEG decode -> views ->
step) is what a real run gets. Their ratio says whether the input path starves the accelerator.
Both use the same model, `train_step` and runtime (bf16 + channels_last on CUDA, optional
torch.compile), with W untimed warm-up steps and one device synchronisation on each side of the
N timed steps, none inside them.

    python -m bench.engine [SPEC] [--set k=v ...] [--steps N] [--warmup W] [--compile]
        [--device cuda|cpu] [--data synthetic|jpeg] [--decode device|workers] [--loader-workers K]
        [--profile N] [--json PATH]
    python -m bench.engine --table RESULTS_DIR_OR_JSON... [--out table.md]

Imports only torch, torchvision, numpy, PIL, yaml, pydantic (via spec) and the stdlib: runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torchvision
from torch.utils.data import DataLoader, RandomSampler

from leoclr_core.data import ImageSource, SyntheticObjects, build_source
from leoclr_core.data.jpeg import EncodedImages
from leoclr_core.data.prefetch import Prefetcher
from leoclr_core.nn.methods import MomentumMethod, build_method
from leoclr_core.spec.models import PretrainSpec, SpecError, load_spec
from leoclr_core.training.engine import Runtime, build_optimizer, prepare_method, resolve_runtime, train_step
from leoclr_core.training.feed import ViewFeed, resize_for_batching
from leoclr_core.spec.placement import InputPlacement

DEFAULT_SPEC = "configs/demo.yaml"
JPEG_QUALITY = 90


_START = time.perf_counter()


def restart_clock() -> None:
    """Stamp later `log` lines from now: each run of a process that runs several (the matrix)."""
    global _START
    _START = time.perf_counter()


def log(msg: str) -> None:
    """A progress line on stderr, stamped with the seconds since start (where a slow run's time went)."""
    print(f"[bench +{time.perf_counter() - _START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def device_name(device: torch.device) -> str:
    """What the figures were measured on: the GPU model, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- timing
@dataclass
class Phase:
    """One measured phase: warm-up (first step separately: it holds any compilation) and timed steps."""

    first_step_s: float | None
    warmup_s: float
    seconds: float
    steps: int
    batch: int
    last_loss: float

    @property
    def instances_per_s(self) -> float:
        return self.steps * self.batch / self.seconds if self.seconds > 0 else 0.0


def measure(step: Callable[[], torch.Tensor], warmup: int, steps: int, batch: int,
            device: torch.device) -> Phase:
    """Run `warmup` untimed steps, then time `steps` steps between two device synchronisations."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = None
    start = time.perf_counter()
    for i in range(warmup):
        step()
        if i == 0:
            sync()
            first = time.perf_counter() - start
    sync()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    return Phase(first, warm, seconds, steps, batch, float(loss) if loss is not None else float("nan"))


# ---------------------------------------------------------------- where a step's device time goes
def profile_steps(step: Callable[[], torch.Tensor], steps: int, device: torch.device) -> dict:
    """Run `steps` more steps under torch.profiler and summarise the device's timeline
    (`summarise_trace`). Figures taken under the profiler, whose overhead slows the host side:
    they say where device time goes, not how fast the run is."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            wall = time.perf_counter() - start
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    return summarise_trace(events, steps, wall)


def _union_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarise_trace(events: Sequence[dict], steps: int, wall_s: float, top: int = 8) -> dict:
    """Device time per step from a Chrome trace's events: kernel time on each stream, copies, the
    union of all of them (busy), so `idle_fraction` = 1 - busy / wall. A side stream's kernels are
    the views made ahead; time they add to the busy union is time they did not overlap the step."""
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    copies = [e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset") and "dur" in e]
    wall_ms = wall_s * 1e3 / steps
    if not kernels:
        return {"steps": steps, "wall_ms_per_step": wall_ms, "device_timeline": False}
    per_stream: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in kernels:
        stream = str(e.get("args", {}).get("stream", "?"))
        per_stream[stream] = per_stream.get(stream, 0.0) + e["dur"]
        by_name[e.get("name", "?")] = by_name.get(e.get("name", "?"), 0.0) + e["dur"]
    busy = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in kernels + copies]) / 1e3 / steps
    ms = 1e-3 / steps
    return {
        "steps": steps, "wall_ms_per_step": wall_ms, "device_timeline": True,
        "busy_ms_per_step": busy, "idle_fraction": max(0.0, 1 - busy / wall_ms) if wall_ms > 0 else 0.0,
        "kernel_ms_per_step_by_stream": {k: v * ms for k, v in sorted(per_stream.items(), key=lambda kv: -kv[1])},
        "copy_ms_per_step": sum(e["dur"] for e in copies) * ms,
        "top_kernels_ms_per_step": {k[:90]: v * ms for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]},
    }


def describe_profile(p: dict) -> str:
    if not p.get("device_timeline"):
        return f"{p['wall_ms_per_step']:.1f} ms a step (no device timeline on this device)"
    streams = ", ".join(f"stream {k} {v:.1f} ms" for k, v in p["kernel_ms_per_step_by_stream"].items())
    return (f"{p['wall_ms_per_step']:.1f} ms a step, device busy {p['busy_ms_per_step']:.1f} ms "
            f"(idle {p['idle_fraction']:.0%}); kernels: {streams}; copies {p['copy_ms_per_step']:.1f} ms")


# ---------------------------------------------------------------- inputs
def random_views(method: MomentumMethod, runtime: Runtime, batch: int, size: int,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Views already on the device, shaped, typed and laid out like the feed's: compute only, no input cost."""
    return tuple(runtime.to_device(torch.randn(batch, 3, size, size, device=runtime.device, dtype=dtype))
                 for _ in method.view_kinds)


# Sources made in this process, by data spec and count: the rows of a matrix run in one process
# share them (the ResNet-50 rows spent 4.6 s each preparing their 1,024 scenes on the H200 box,
# most of it rendering). At most _KEPT of them, the newest, so a long-lived process holds a few.
_SOURCES: dict[tuple[str, int], ImageSource] = {}
_KEPT = 2


def bench_images(spec: PretrainSpec, count: int) -> ImageSource:
    """The first `count` images of the spec's source (synthetic scenes are rendered, only that many),
    made once per process for a given data spec and count."""
    data = spec.data
    key = (data.model_dump_json(), count)
    if key not in _SOURCES:
        if data.source == "synthetic-objects":
            source = SyntheticObjects(count, data.seed, "train", data.synthetic, labelled=data.labelled)
        else:
            source = build_source(data.model_copy(update={"num_images": count}), "train",
                                  resize_to=resize_for_batching(data))
        while len(_SOURCES) >= _KEPT:
            _SOURCES.pop(next(iter(_SOURCES)))
        _SOURCES[key] = source
    return _SOURCES[key]


@dataclass
class Feed:
    """The end-to-end input path of one config: the product's feed (`ViewFeed`) over the prepared
    images, and what those images are."""

    view_feed: ViewFeed
    jpeg: bool
    jpeg_bytes: int = 0  # total encoded size: synthetic scenes compress far better than photographs

    @property
    def batched(self) -> bool:
        return self.view_feed.placement.views_on_device

    @property
    def device_decode(self) -> bool:  # JPEGs decoded on the training device (else by the loader workers)
        return self.view_feed.placement.decode_on_device

    def describe(self, device: torch.device) -> str:
        where = "nvJPEG" if device.type == "cuda" else "CPU"
        decode = (f" + {where} batch decode" if self.device_decode else " + decode in workers") if self.jpeg else ""
        return (f"batched views on {device.type}" if self.batched else "per-sample views in workers") + decode


DECODE_PLACES = ("device", "workers")


def build_feed(spec: PretrainSpec, method: MomentumMethod, runtime: Runtime, images: ImageSource, jpeg: bool,
               decode: str = "device", compile_views: bool | None = None) -> Feed:
    """The product's feed over `images` (JPEG-encoding them once when `jpeg`); not part of any
    timing. With batched views, `decode` says where JPEGs are decoded: on the training device (the
    product's image-folder path, `data.decode: gpu`) or by the loader workers (`cpu`)."""
    if decode not in DECODE_PLACES:
        raise ValueError(f"decode must be one of {DECODE_PLACES}, got {decode!r}")
    placement = InputPlacement.for_process(spec, runtime.device.type)
    # The spec's source is synthetic (nothing to decode by its rule): the bench says where JPEGs go.
    placement = replace(placement, decode_on_device=jpeg and decode == "device" and placement.views_on_device)
    source = EncodedImages(images, JPEG_QUALITY, decode=True) if jpeg else images
    view_feed = ViewFeed(spec, method, runtime, source, placement, compile_views=compile_views)
    return Feed(view_feed, jpeg, source.nbytes if isinstance(source, EncodedImages) else 0)


def view_batches(feed: Feed, spec: PretrainSpec, runtime: Runtime, workers: int, num_batches: int,
                 prefetch: int = 2) -> Iterator[tuple[torch.Tensor, ...]]:
    """`num_batches` batches of views on the device, cycling through the dataset as often as needed.

    With `prefetch` > 0 on a GPU, decoding and views run that many batches ahead on a side stream.
    """
    f = feed.view_feed
    sampler = RandomSampler(f.dataset, num_samples=num_batches * spec.optim.batch_size,
                            generator=torch.Generator().manual_seed(spec.seed))
    loader = DataLoader(
        f.dataset, batch_size=spec.optim.batch_size, sampler=sampler, drop_last=True, collate_fn=f.collate,
        num_workers=workers, pin_memory=f.pin_memory, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    if prefetch > 0:
        yield from Prefetcher(loader, f.prepare, runtime.device, depth=prefetch)
    else:
        yield from map(f.prepare, loader)


# ---------------------------------------------------------------- one benchmark
def run_bench(spec: PretrainSpec, *, device: torch.device, steps: int, warmup: int, data: str,
              workers: int, max_images: int, prefetch: int = 2, compile_views: bool | None = None,
              profile: int = 0, decode: str = "device") -> dict:
    """Measure compute-only then end-to-end throughput of `spec` on `device`; returns the record.
    `profile` > 0: that many more steps of each phase under the profiler (`profile_steps`)."""
    torch.manual_seed(spec.seed)
    runtime = resolve_runtime(spec.scaling, device)
    b, size = spec.optim.batch_size, spec.data.image_size
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    method = prepare_method(build_method(spec.method, spec.model, spec.loss, b), runtime)
    method.train()
    optimizer = build_optimizer(method, spec.optim)
    build_s = time.perf_counter() - t0
    # Both phases start from these weights: the compute-only phase fits one static random batch,
    # which must not become the starting point of the end-to-end phase.
    initial = copy.deepcopy(method.state_dict()), copy.deepcopy(optimizer.state_dict())
    m = spec.loss.momentum

    log(f"compute-only: {warmup} warm-up{' (compiling)' if runtime.compile else ''} + {steps} timed steps")
    on_device = InputPlacement.for_process(spec, runtime.device.type).views_on_device
    dtype = runtime.view_dtype if on_device else torch.float32
    views = [random_views(method, runtime, b, size, dtype)]  # a list, so the memory is freed right after
    compute = measure(lambda: train_step(method, optimizer, views[0], m, runtime), warmup, steps, b, device)
    # Printed at once, so a run cut short during the end-to-end phase still leaves this figure.
    log(f"compute-only: {compute.instances_per_s:,.0f} instances/s"
        + (f" (first step {compute.first_step_s:.0f} s)" if compute.first_step_s is not None else ""))
    profiles = {}
    if profile:
        profiles["compute"] = profile_steps(lambda: train_step(method, optimizer, views[0], m, runtime),
                                            profile, device)
        log(f"compute-only under the profiler: {describe_profile(profiles['compute'])}")
    views.clear()

    method.load_state_dict(initial[0])  # in place: compiled graphs stay valid
    optimizer.load_state_dict(initial[1])
    count = max(b, min(max_images, (warmup + steps) * b, spec.data.num_images or max_images))
    log(f"preparing {count} images ({data}) for the end-to-end run")
    t0 = time.perf_counter()
    if compile_views is None:
        compile_views = runtime.compile_views
    feed = build_feed(spec, method, runtime, bench_images(spec, count), jpeg=data == "jpeg", decode=decode,
                      compile_views=compile_views)
    data_s = time.perf_counter() - t0
    log(f"end-to-end ({feed.describe(device)}, {workers} loader workers): "
        f"{warmup} warm-up + {steps} timed steps")
    batches = view_batches(feed, spec, runtime, workers, warmup + steps + profile, prefetch)
    e2e = measure(lambda: train_step(method, optimizer, next(batches), m, runtime), warmup, steps, b, device)
    log(f"end-to-end: {e2e.instances_per_s:,.0f} instances/s (first step {e2e.first_step_s or 0:.1f} s)")
    if profile:
        profiles["e2e"] = profile_steps(lambda: train_step(method, optimizer, next(batches), m, runtime),
                                        profile, device)
        log(f"end-to-end under the profiler: {describe_profile(profiles['e2e'])}")
    batches.close()
    finite = {}
    for name, phase in (("compute", compute), ("e2e", e2e)):
        finite[name] = math.isfinite(phase.last_loss)
        if not finite[name]:  # a rate measured on NaNs is still a rate, but not of a working training run
            log(f"WARNING: the {name} phase ended with a non-finite loss ({phase.last_loss})")

    compute_rate, e2e_rate = compute.instances_per_s, e2e.instances_per_s
    compile_s = None
    if runtime.compile and compute.first_step_s is not None:
        compile_s = max(0.0, compute.first_step_s - compute.seconds / max(steps, 1))
    return {
        "config": spec.name, "method": spec.method, "backbone": spec.model.backbone,
        "cifar_stem": spec.model.cifar_stem, "image_size": size, "batch_size": b,
        "compile": runtime.compile, "data": data, "feed": feed.describe(device), "loader_workers": workers,
        "prefetch": prefetch if cuda else 0, "compile_views": compile_views and feed.batched,
        "images_prepared": count, "jpeg_kib_per_image": feed.jpeg_bytes / count / 1024 if feed.jpeg else None,
        "device": device.type, "device_name": device_name(device),
        "precision": "bf16" if runtime.autocast_dtype == torch.bfloat16 else "fp32",
        "channels_last": runtime.channels_last, "steps": steps, "warmup": warmup,
        "compute_inst_per_s": compute_rate, "e2e_inst_per_s": e2e_rate,
        "ratio": e2e_rate / compute_rate if compute_rate > 0 else 0.0,
        "loss_finite": finite,
        "compile_s": compile_s, "setup_s": {"build": build_s, "data": data_s}, "profile": profiles or None,
        "phases": {"compute": asdict(compute), "e2e": asdict(e2e)},
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.model_dump(mode="json"),
    }


# ---------------------------------------------------------------- tables
COLUMNS = ("config", "device", "method", "backbone", "px", "batch", "compile", "data",
           "input path", "compute inst/s", "e2e inst/s", "e2e/compute", "compile s", "peak GiB", "final loss")


def _fmt(value, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def table_row(r: dict) -> list[str]:
    """One markdown row; a record with an `error` (a failed or skipped run) keeps its name and says why."""
    if "error" in r:
        return [str(r.get("config", "?")), "-", str(r.get("method", "-")), "-", "-", "-",
                "on" if r.get("compile") else "off", "-", "-", str(r["error"]), "-", "-", "-", "-", "-"]
    return [r["config"], r["device_name"], r["method"], r["backbone"], str(r["image_size"]),
            str(r["batch_size"]), "on" if r["compile"] else "off", r["data"], input_path(r),
            _fmt(r["compute_inst_per_s"]), _fmt(r["e2e_inst_per_s"]),
            _fmt(r["ratio"], ".2f"), _fmt(r.get("compile_s"), ".0f"), _fmt(r.get("peak_gpu_mem_gib"), ".1f"),
            final_losses(r)]


def input_path(r: dict) -> str:
    """How views reached the step: made ahead on a side stream or inline, compiled or eager."""
    if "prefetch" not in r:
        return "-"
    ahead = f"{r['prefetch']} ahead" if r["prefetch"] else "inline"
    workers = r.get("data") == "jpeg" and r.get("feed", "").endswith("decode in workers")
    return ahead + (", compiled views" if r.get("compile_views") else "") + (", JPEG decoded in workers" if workers else "")


def final_losses(r: dict) -> str:
    """The last loss of each phase, "compute / e2e": a NaN there means the rate is not of a working run."""
    phases = r.get("phases", {})
    return " / ".join(format(phases[k]["last_loss"], ".2f") if k in phases else "-" for k in ("compute", "e2e"))


def markdown_table(records: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in records]
    return "\n".join(lines) + "\n"


def load_records(paths: Sequence[str | Path]) -> list[dict]:
    """Bench records from JSON files and folders of them (a folder's files in name order)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return [json.loads(f.read_text()) for f in files]


# ---------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=None, help=f"pretrain spec (default {DEFAULT_SPEC})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    p.add_argument("--steps", type=int, default=20, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each phase")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--compile", action="store_true", help="set scaling.compile (compile time is warm-up)")
    p.add_argument("--data", choices=("synthetic", "jpeg"), default="synthetic")
    p.add_argument("--decode", choices=DECODE_PLACES, default="device",
                   help="--data jpeg with batched views: decode on the training device or in loader workers")
    p.add_argument("--loader-workers", type=int, default=None, help="default: scaling.loader_workers")
    p.add_argument("--max-images", type=int, default=4096, help="distinct images prepared (then cycled)")
    p.add_argument("--prefetch", type=int, default=2,
                   help="GPU: batches prepared ahead on a side stream (0: inline, between steps)")
    p.add_argument("--compile-views", choices=("auto", "on", "off"), default="auto",
                   help="compile the batched views (auto: when the model is compiled, on a GPU)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="N more steps of each phase under torch.profiler: device time per stream, idle share")
    p.add_argument("--json", type=Path, default=None, help="write the record here")
    p.add_argument("--table", nargs="+", default=None, metavar="PATH",
                   help="merge JSON records (files or folders) into a markdown table")
    p.add_argument("--out", type=Path, default=None, help="with --table: write the markdown here")
    return p.parse_args(argv)


def resolve_spec_path(path: str | None) -> Path:
    """The default spec is found from the current folder or, failing that, the repository root."""
    if path is not None:
        return Path(path)
    here = Path(DEFAULT_SPEC)
    return here if here.exists() else Path(__file__).resolve().parents[1] / DEFAULT_SPEC


def load_bench_spec(args: argparse.Namespace) -> PretrainSpec:
    overrides = list(args.overrides) + (["scaling.compile=true"] if args.compile else [])
    spec = load_spec(resolve_spec_path(args.spec), overrides)
    if not isinstance(spec, PretrainSpec):
        raise SpecError(f"the bench needs a pretrain spec, got a {spec.kind!r} spec")
    return spec


def check_args(args: argparse.Namespace) -> str | None:
    if args.steps < 1 or args.warmup < 0 or args.max_images < 1:
        return "--steps and --max-images must be >= 1 and --warmup >= 0"
    if args.prefetch < 0 or args.profile < 0:
        return "--prefetch and --profile must be >= 0"
    if args.loader_workers is not None and args.loader_workers < 0:
        return "--loader-workers must be >= 0"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
        return int(exc.code or 0)
    if args.table is not None:
        text = markdown_table(load_records(args.table))
        if args.out:
            args.out.write_text(text)
        print(text, end="")
        return 0
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        spec = load_bench_spec(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_args(args, spec)
    return 0


def run_args(args: argparse.Namespace, spec: PretrainSpec) -> dict:
    """Run the bench that checked `args` ask for on `spec`: print its table row, write its JSON."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = spec.scaling.loader_workers if args.loader_workers is None else args.loader_workers
    record = run_bench(spec, device=device, steps=args.steps, warmup=args.warmup, data=args.data,
                       workers=workers, max_images=args.max_images, prefetch=args.prefetch,
                       compile_views={"auto": None, "on": True, "off": False}[args.compile_views],
                       profile=args.profile, decode=args.decode)
    print(markdown_table([record]), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        log(f"wrote {args.json}")
    return record


if __name__ == "__main__":
    sys.exit(main())
