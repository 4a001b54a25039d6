"""Ray path against the in-process engine, on the same config, side by side in one run.

    python -m bench.ray_vs_engine [SPEC] [--epochs 3] [--set a.b=v ...]

Runs the spec (default: the CPU demo, shortened) three times: in this process on one CPU thread;
on a local Ray with 1 training worker; with 2 training workers (1 CPU each). Each run's rate is
the mean instances/s of its epochs after the first (warm-up), as the engine measures it (views
in, optimiser step done). Prints a table, the per-worker-CPU ratio Ray/in-process, and where each
epoch's time went (waiting for input vs computing); writes the figures as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from leoclr_core.spec.models import PretrainSpec, load_spec, parse_spec

console = Console()
DEFAULT_SPEC = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _rate(records: list[dict[str, Any]]) -> dict[str, float]:
    epochs = [r for r in records if r.get("type") == "epoch"]
    timed = epochs[1:] or epochs  # the first epoch pays for start-up (pools, caches)
    seconds = sum(r["epoch_seconds"] for r in timed)
    waited = sum(r.get("input_seconds", 0.0) for r in timed)
    return {
        "instances_per_s": statistics.fmean(r["instances_per_s"] for r in timed),
        "input_fraction": waited / seconds if seconds else 0.0,
        "epochs_timed": len(timed),
    }


def _spec(base: PretrainSpec, workers: int, out: Path, name: str) -> PretrainSpec:
    raw = base.model_dump(mode="json")
    raw["name"] = name
    raw["output_dir"] = str(out / name)
    raw["scaling"] = {**raw["scaling"], "num_workers": workers, "cpus_per_worker": 1.0}
    raw["checkpoint"] = {**raw["checkpoint"], "resume": False, "log_to_mlflow": False,
                         "every": base.optim.epochs, "storage_path": str(out / "ray")}
    raw["register"] = {"model_name": None, "alias": "candidate"}
    return parse_spec(raw)


def run_bench(spec: PretrainSpec, out: Path) -> dict[str, Any]:
    from leoclr_core.training.pretrain import pretrain
    from leoclr_core.spec.resources import pretrain_cpus as cluster_cpus_needed
    from leoclr_core.distributed.pretrain import run_pretrain
    from leoclr_core.distributed.session import ray_session

    results: dict[str, Any] = {"device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "torch": torch.__version__, "spec": spec.name, "epochs": spec.optim.epochs,
                               "batch_size": spec.optim.batch_size, "date": time.strftime("%Y-%m-%d")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = pretrain(_spec(spec, 1, out, "bench-inprocess"), device="cpu")
    finally:
        torch.set_num_threads(threads)
    results["in_process"] = _rate(state.history)
    two = _spec(spec, 2, out, "bench-ray-2")
    with ray_session(cluster_cpus_needed(two), log_to_driver=False):
        for workers in (1, 2):
            run = run_pretrain(_spec(spec, workers, out, f"bench-ray-{workers}"))
            results[f"ray_{workers}_workers"] = _rate(run.records)
    base = results["in_process"]["instances_per_s"]
    for workers in (1, 2):
        r = results[f"ray_{workers}_workers"]
        r["per_worker_ratio"] = r["instances_per_s"] / workers / base
    return results


def print_results(results: dict[str, Any]) -> None:
    table = Table("path", "CPUs training", "instances/s", "per worker-CPU vs in-process", "input wait")
    rows = [("in-process (1 thread)", 1, results["in_process"], None)]
    rows += [(f"Ray Train, {w} worker(s)", w, results[f"ray_{w}_workers"], results[f"ray_{w}_workers"]["per_worker_ratio"])
             for w in (1, 2)]
    for name, cpus, r, ratio in rows:
        table.add_row(name, str(cpus), f"{r['instances_per_s']:.0f}", "-" if ratio is None else f"{ratio:.2f}",
                      f"{100 * r['input_fraction']:.0f}% of epoch")
    console.print(table)
    console.print(f"{results['cpus']} CPUs, torch {results['torch']}, {results['spec']}, "
                  f"{results['epochs']} epochs (first not timed), batch {results['batch_size']}")


def main(
    spec_path: Path = typer.Argument(DEFAULT_SPEC, help="Pretrain spec to benchmark (default: the CPU demo)."),
    epochs: int = typer.Option(3, help="Epochs per run; the first is warm-up."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", "-s", help="section.field=value (repeatable)."),
    output: Path = typer.Option(Path("bench-results/ray"), "--output", "-o"),
) -> None:
    logging.basicConfig(level=logging.WARNING)
    spec = load_spec(spec_path, [f"optim.epochs={epochs}", "eval.knn_every=0", *(overrides or [])])
    if not isinstance(spec, PretrainSpec):
        raise typer.BadParameter(f"{spec_path} is not a pretrain spec")
    output.mkdir(parents=True, exist_ok=True)
    results = run_bench(spec, output)
    print_results(results)
    (output / "ray-vs-inprocess.json").write_text(json.dumps(results, indent=2))
    console.print(f"figures: {output / 'ray-vs-inprocess.json'}")


if __name__ == "__main__":  # pragma: no cover
    typer.run(main)
