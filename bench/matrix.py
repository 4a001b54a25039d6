"""The reference throughput matrix: `bench.engine` on 8 rows in one process, under a time budget.

The rows: ResNet-50 at 224 px, batch 256, with JPEG input (bench/r50-224.yaml), and ResNet-18 with
the CIFAR stem at 32 px, batch 512, on raw pixels (bench/r18-cifar.yaml). Each runs LeOCLR and
MoCo-v2 (asymmetric), eager and compiled. `bench/gpu.sh` is the wrapper to call.

Why few processes: on an H200 each row run as its own process cost 8-13 s outside its measured
phases (Python and torch imports, CUDA start-up, worker and compiler-pool shutdown). Eight rows
pay that eight times, out of a 6-minute budget. Between rows the process frees the device memory
and resets torch.compile's in-memory caches, so each compiled row compiles as it would in its own
process: the on-disk inductor cache is the only thing that carries over, as it did before.

Why not one: what a ResNet-50 row leaves in the process slows the ResNet-18 rows after it. Their
steps are 13-24 ms long and bound by the host launching kernels. Side by side on one H200
(docs/bench/h200-2026-11-27-one-process/), the compiled ResNet-18 LeOCLR row ran at 37,889
instances/s compute-only in a process of its own, 35,739 after an eager ResNet-18 row, 32,956
after an eager ResNet-50 row, and 29,211 after a compiled ResNet-50 row (which left 3 times the
Python objects and a compile-worker pool). So on a GPU the rows of each config share a process
(`--processes per-config`, the default there): the ResNet-50 rows, then the ResNet-18 rows in a
new one. The ResNet-50 steps are bound by the device, and rows before them did not change their
rates.

How rows run:
- In order: the ResNet-50 rows (the goals about the input path), then the ResNet-18 rows; in each,
  eager first, then compiled. A row that no longer fits the budget is recorded as skipped.
- On a GPU, before the first row of another config the process exits with 75, and the next
  process runs that config's rows.
- A row has its own time limit. Past it, the row is recorded as timed out and the process exits
  with 124.
- A row that fails on the default input path (views made ahead on a side stream, compiled views
  with a compiled model) is measured again on the plain path (`--prefetch 0 --compile-views
  off`), and its record says so. On a CPU this happens in the same process. On a GPU the process
  exits with 75 first, because a CUDA error can leave a process unable to use the device.
- Running the command again with the same `--out` and `--started` goes on where it stopped. Rows
  that have a record are not run again.

    python -m bench.matrix --out DIR [--budget S] [--started EPOCH_S] [--device cuda|cpu]
        [--loader-workers K] [--prefetch N] [--compile-views auto|on|off] [--only ID ...]
        [--processes auto|per-config|one]
        [--set K=V ...] [--steps N] [--warmup W] [--max-images M] [--limit S] [--list]

Exit status:
- 0: every row asked for has a record (measured, failed, skipped or timed out).
- 75: the process stopped after a failure on a GPU, or before another config's rows; run again
  to go on.
- 124: a row ran past its limit; it has a record; run again to go on.
- 2: bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

import torch

from bench import engine as bench
from leoclr_core.spec.models import SpecError

RESTART = 75  # EX_TEMPFAIL: run again to go on
TIMED_OUT = 124  # what `timeout` exits with, so a wrapper treats both alike
R50, R18 = "bench/r50-224.yaml", "bench/r18-cifar.yaml"


@dataclass(frozen=True)
class Row:
    id: str  # gives the table order; the position in ROWS gives the run order
    spec: str
    method: str
    compiled: bool
    data: str
    steps: int
    warmup: int
    need_s: float  # budget a row must still have to start
    limit_s: float  # its own limit, never past the budget
    extra: tuple[str, ...] = ()

    @property
    def config(self) -> str:
        return Path(self.spec).stem


# R50 renders 1024 distinct 256 px scenes (a few seconds) and cycles them; R18's 40 px ones are cheap.
# --profile: a few more steps of each phase under torch.profiler on the rows the ratio goal is about,
# so the record says where the end-to-end phase loses time.
_R50 = ("--max-images", "1024")
ROWS: tuple[Row, ...] = (
    Row("01-r50-leoclr-eager", R50, "leoclr", False, "jpeg", 30, 5, 45, 120, (*_R50, "--profile", "4")),
    Row("03-r50-mocov2-eager", R50, "mocov2", False, "jpeg", 30, 5, 45, 120, _R50),
    # The compiled LeOCLR row first (the figures the goals are about); MoCo-v2's then reuses its
    # query-encoder graphs from the on-disk cache. Needs from the H200 runs of 2026-11-27: 04 about
    # 70 s (a 43-46 s compile), 08 26-36 s. A row that starts and overruns is recorded as timed out.
    Row("02-r50-leoclr-compiled", R50, "leoclr", True, "jpeg", 30, 8, 90, 240, (*_R50, "--profile", "4")),
    Row("04-r50-mocov2-compiled", R50, "mocov2", True, "jpeg", 30, 8, 75, 240, _R50),
    Row("05-r18-leoclr-eager", R18, "leoclr", False, "synthetic", 60, 5, 30, 90),
    Row("07-r18-mocov2-eager", R18, "mocov2", False, "synthetic", 60, 5, 30, 90),
    Row("06-r18-leoclr-compiled", R18, "leoclr", True, "synthetic", 60, 8, 60, 150),
    Row("08-r18-mocov2-compiled", R18, "mocov2", True, "synthetic", 60, 8, 45, 150),
)


def bench_argv(row: Row, opts: argparse.Namespace, plain: bool) -> list[str]:
    """The `bench.engine` command line of `row`: what `python -m bench.engine` would take."""
    steps = row.steps if opts.steps is None else opts.steps
    warmup = row.warmup if opts.warmup is None else opts.warmup
    argv = [row.spec, "--device", opts.device, "--data", row.data, "--steps", str(steps),
            "--warmup", str(warmup), "--json", str(opts.out / f"{row.id}.json"), "--set", f"method={row.method}"]
    if row.method == "mocov2":
        argv += ["--set", "loss.symmetric=false"]
    for override in opts.overrides:
        argv += ["--set", override]
    if opts.loader_workers is not None:
        argv += ["--loader-workers", str(opts.loader_workers)]
    argv += (["--prefetch", "0", "--compile-views", "off"] if plain
             else ["--prefetch", str(opts.prefetch), "--compile-views", opts.compile_views])
    if row.compiled:
        argv.append("--compile")
    argv += row.extra
    if opts.max_images is not None:
        argv += ["--max-images", str(opts.max_images)]  # the last one wins over the row's
    return argv


def record(out: Path, row: Row, error: str) -> None:
    """A stand-in record for a row with no measurement: the table keeps its place and says why."""
    stand_in = {"config": row.config, "method": row.method, "compile": row.compiled,
                "error": " ".join(error.split())}  # one line: it becomes a table cell
    (out / f"{row.id}.json").write_text(json.dumps(stand_in) + "\n")


class _Tee:
    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno...: the console's
        return getattr(self.streams[0], name)


@contextlib.contextmanager
def teed(path: Path) -> Iterator[None]:
    """Python's stdout and stderr also go to `path` (the row's log). Loggers that hold a stream
    from before, such as TORCH_LOGS's, still print to the console only."""
    with open(path, "w") as f:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, f), _Tee(err, f)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


@contextlib.contextmanager
def watchdog(seconds: float, on_timeout: Callable[[], None]) -> Iterator[None]:
    """Call `on_timeout` (which should end the process) if the block runs past `seconds`."""
    timer = threading.Timer(seconds, on_timeout)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def leftovers(device: str) -> str:
    """What the process holds as a row starts (what earlier rows may have left behind): a row run
    after others should start from what a fresh process has, give or take the imports."""
    held = f", device memory {torch.cuda.memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else ""
    return (f"{threading.active_count()} threads, {_children()} child processes, "
            f"{len(gc.get_objects()):,} Python objects{held}")


def _children() -> int:
    """Live child processes: loader workers (multiprocessing) and compile workers (subprocess) alike."""
    tasks = Path("/proc/self/task")  # Linux: each thread's children, as the kernel lists them
    if not tasks.is_dir():
        return len(multiprocessing.active_children())
    try:
        return sum(len(t.read_text().split()) for t in tasks.glob("*/children"))
    except OSError:  # a thread that ended while being read
        return len(multiprocessing.active_children())


def release(device: str) -> None:
    """What one row leaves behind, freed before the next: its memory and its compiled graphs."""
    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_row(row: Row, opts: argparse.Namespace, plain: bool, log_path: Path) -> str:
    """Run one row in this process: "ok", "refused" (its arguments or spec) or "failed"."""
    argv = bench_argv(row, opts, plain)
    args = bench.parse_args(argv)
    problem = bench.check_args(args)
    try:
        spec = bench.load_bench_spec(args) if problem is None else None
    except SpecError as exc:
        problem = str(exc)
    if problem is not None:
        log_path.write_text(f"error: {problem}\n")
        return "refused"
    bench.restart_clock()
    with teed(log_path):
        print(f"=== {row.id}: python -m bench.engine {' '.join(argv)}", file=sys.stderr)
        try:
            bench.run_args(args, spec)
            return "ok"
        except Exception:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc()
            return "failed"
        finally:
            release(opts.device)


def run_matrix(opts: argparse.Namespace) -> int:
    out: Path = opts.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in ROWS if not opts.only or r.id in opts.only]

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def left() -> float:
        return opts.budget - (time.time() - opts.started)

    def attempt(row: Row, plain: bool) -> str | None:
        """Run `row` if the budget allows: its outcome, or None when it did not fit."""
        if left() < row.need_s:
            return None
        limit = min(row.limit_s, left(), opts.limit or math.inf)

        def timed_out() -> None:
            record(out, row, f"timed out after {limit:.0f}s")
            say(f"=== {row.id}: timed out after {limit:.0f}s")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(TIMED_OUT)

        say(f"=== {row.id}: {row.config} {row.method} compile={str(row.compiled).lower()} data={row.data}"
            f"{' (plain path)' if plain else ''} (limit {limit:.0f}s, {left():.0f}s of the budget left)"
            f"; holding {leftovers(opts.device)}")
        t0 = time.perf_counter()
        with watchdog(limit, timed_out):
            outcome = run_row(row, opts, plain, out / f"{row.id}.log")
        say(f"=== {row.id}: {outcome} after {time.perf_counter() - t0:.0f}s")
        return outcome

    per_config = opts.processes == "per-config" or (opts.processes == "auto" and opts.device == "cuda")
    config_run = None  # the config of the rows this process has run
    for row in rows:
        if (out / f"{row.id}.json").exists():  # measured or recorded by an earlier process
            continue
        if per_config and config_run not in (None, row.spec) and left() >= row.need_s:
            say(f"=== {row.id}: the {row.config} rows run in a new process")
            return RESTART
        marker = out / f"{row.id}.plain"  # the default path failed in an earlier process
        # A row asked for on the plain path already has nothing to fall back to.
        plain = marker.exists() or (opts.prefetch == 0 and opts.compile_views == "off")
        outcome = attempt(row, plain)
        if outcome is not None:
            config_run = row.spec
        if outcome is None:
            say(f"=== {row.id}: skipped ({left():.0f}s of the {opts.budget:.0f}s budget left, needs {row.need_s:.0f}s)")
            record(out, row, "skipped: time budget")
            continue
        if outcome == "refused":
            record(out, row, f"refused: {(out / f'{row.id}.log').read_text().strip()[:200]}")
            continue
        if outcome == "ok":
            continue
        if not plain:  # measure it again on the plain path, keeping the failed try's log
            (out / f"{row.id}.log").replace(out / f"{row.id}.failed.log")
            if opts.device == "cuda":
                marker.touch()
                say(f"=== {row.id}: failed on the default path; a new process measures it on the plain path")
                return RESTART
            outcome = attempt(row, plain=True)
            if outcome == "ok":
                continue
        record(out, row, f"failed, see {row.id}.log" if outcome else "failed; no budget left to retry")
        if opts.device == "cuda":
            return RESTART
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.matrix", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder of the rows' records (ID.json) and logs (ID.log)")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for the whole matrix, from --started")
    p.add_argument("--started", type=float, default=None,
                   help="when the matrix started (seconds since the epoch; default now): a rerun shares the budget")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--loader-workers", type=int, default=None, help="default: each spec's scaling.loader_workers")
    p.add_argument("--prefetch", type=int, default=2, help="batches made ahead on a side stream (0: inline)")
    p.add_argument("--compile-views", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--only", nargs="+", default=None, metavar="ID", help="these rows only")
    p.add_argument("--processes", choices=("auto", "per-config", "one"), default="auto",
                   help="per-config: exit 75 before another config's rows, for a new process to run them "
                        "(auto: per-config on a GPU, one on a CPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                   help="a spec override for every row (a smaller model to try the matrix on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per phase, every row")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per phase, every row")
    p.add_argument("--max-images", type=int, default=None, help="distinct images per row")
    p.add_argument("--limit", type=float, default=None, help="no row runs longer than this many seconds")
    p.add_argument("--list", action="store_true", help="print the row IDs in run order and stop")
    return p.parse_args(argv)


def check(opts: argparse.Namespace) -> str | None:
    ids = {r.id for r in ROWS}
    unknown = sorted(set(opts.only or ()) - ids)
    if unknown:
        return f"--only: no row {', '.join(unknown)} (rows: {', '.join(r.id for r in ROWS)})"
    if opts.out is None and not opts.list:
        return "--out is required"
    if opts.budget <= 0 or (opts.limit is not None and opts.limit <= 0):
        return "--budget and --limit must be > 0"
    if opts.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    problem = check(opts)
    if problem is None and opts.list:
        print("\n".join(r.id for r in ROWS if not opts.only or r.id in opts.only))
        return 0
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    opts.device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts.started = time.time() if opts.started is None else opts.started
    return run_matrix(opts)


if __name__ == "__main__":
    sys.exit(main())
