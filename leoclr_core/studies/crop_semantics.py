"""The crop-semantics experiment: does anchoring crops to the original image help when crops disagree?

LeOCLR's claim is that two random crops with different semantic content teach MoCo-v2 that
unrelated content is "the same". `synthetic-objects` lets us dial that in: one labelled object
on clutter (crops mostly agree), the same with a distractor object of another class (crops
often show different objects), and small objects (crops often miss the object). Every method is
trained with the same seed, data, epochs, backbone and optimiser; accuracy is offline k-NN
(k=200, t=0.1) on frozen backbone features of the whole image, against a random-init encoder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from leoclr_core.training.engine import resolve_runtime
from leoclr_core.nn.model import build_backbone
from leoclr_core.spec.models import PretrainSpec, parse_spec
from leoclr_core.training.callbacks import Callbacks
from leoclr_core.training.feed import job_source
from leoclr_core.training.pretrain import pretrain, run_knn

# One base spec for every run; the variants and methods below only override fields of it.
BASE: dict[str, Any] = {
    "kind": "pretrain",
    "seed": 0,
    "data": {
        "source": "synthetic-objects",
        "num_images": 8192,
        "num_test_images": 1000,
        "image_size": 16,
        # Muted colours and light clutter: a random colour per image is an instance identity a
        # small model learns long before shapes (at chroma 1.0 neither method leaves chance
        # within a CPU budget).
        "synthetic": {"source_size": 32, "num_classes": 10, "chroma": 0.25, "clutter": 6},
    },
    "model": {"backbone": "tiny", "width": 16, "proj_hidden_dim": 512, "proj_dim": 128},
    # queue = 1/8 of the data: a stale key of the query's own image is rarely among the negatives.
    "loss": {"temperature": 0.2, "queue_size": 1024, "momentum": 0.99},
    "augment": {"batched": True},
    "optim": {"epochs": 30, "batch_size": 256, "lr": 0.06, "weight_decay": 5e-4},
    "eval": {"knn_every": 5, "knn_k": 200},
    "checkpoint": {"every": 5, "keep": 1},
}

# Data variants: (description, overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "one-object": (
        "one 13-19 px object (of 32), no distractor",
        ["data.synthetic.object_size=[13, 19]", "data.synthetic.distractors=0"],
    ),
    "distractor": (
        "13-19 px object + one 8-13 px distractor of another class",
        ["data.synthetic.object_size=[13, 19]", "data.synthetic.distractors=1",
         "data.synthetic.distractor_size=[8, 13]"],
    ),
    "small-objects": (
        "9-13 px object + one 6-9 px distractor: crops often miss the object",
        ["data.synthetic.object_size=[9, 13]", "data.synthetic.distractors=1",
         "data.synthetic.distractor_size=[6, 9]"],
    ),
}

# Methods compared: (label, overrides). The same engine, data, budget and seed for each.
METHODS: dict[str, list[str]] = {
    "LeOCLR": ["method=leoclr"],
    "MoCo-v2": ["method=mocov2"],
    # Not in the paper: crops are also pulled toward f_k(X), so the query encoder sees crops.
    "LeOCLR-sym": ["method=leoclr", "loss.symmetric=true"],
    "MoCo-v2-sym": ["method=mocov2", "loss.symmetric=true"],
}
DEFAULT_METHODS = ["LeOCLR", "MoCo-v2"]

QUICK: list[str] = [
    "data.num_images=256", "data.num_test_images=128", "model.width=4", "model.proj_hidden_dim=64",
    "model.proj_dim=32", "loss.queue_size=128", "optim.batch_size=64", "optim.epochs=2", "eval.knn_every=1",
    "eval.knn_k=20", "checkpoint.every=1",
]


def _spec(name: str, variant: list[str], method: list[str], extra: list[str], output: Path) -> PretrainSpec:
    spec = parse_spec(BASE, [f"name={name}", f"output_dir={output / name}", *variant, *method, *extra])
    assert isinstance(spec, PretrainSpec)
    return spec


def random_init_knn(spec: PretrainSpec, device: str | None) -> float:
    """k-NN accuracy of an untrained encoder with the runs' seed: the floor every method must beat."""
    torch.manual_seed(spec.seed)
    backbone, _ = build_backbone(spec.model)
    runtime = resolve_runtime(spec.scaling, device)
    backbone.to(runtime.device)
    result = run_knn(backbone, spec, runtime, job_source(spec.data, "train"), job_source(spec.data, "test"))
    return float(result.knn_top1)  # type: ignore[arg-type]


class _Quiet(Callbacks):
    def __init__(self, console: Console, label: str):
        self.console, self.label = console, label

    def on_epoch(self, record, state) -> None:
        if "knn_top1" in record:
            self.console.print(
                f"  {self.label}: epoch {record['epoch']}/{state.epochs} loss {record['loss']:.3f} "
                f"k-NN {record['knn_top1']:.1f}%  {record['instances_per_s']:.0f} inst/s"
            )


def run_crop_semantics(
    output: Path,
    *,
    quick: bool = False,
    device: str | None = None,
    epochs: int | None = None,
    only: list[str] | None = None,
    methods: list[str] | None = None,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train every method on every variant; write results.json, results.md and accuracy.png."""
    console = console or Console(stderr=True)
    output = Path(output)
    extra = (QUICK if quick else []) + ([f"optim.epochs={epochs}"] if epochs else []) + list(overrides or [])
    names = only or list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    labels = methods or DEFAULT_METHODS
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {"quick": quick, "device": device, "methods": labels, "variants": {}}
    start = time.perf_counter()
    for variant in names:
        desc, v_over = VARIANTS[variant]
        console.print(f"[bold]{variant}[/bold]: {desc}")
        row: dict[str, Any] = {"description": desc, "methods": {}}
        for label in labels:
            spec = _spec(f"{variant}-{label.lower()}", v_over, METHODS[label], extra, output)
            t0 = time.perf_counter()
            state = pretrain(spec, device=device, callbacks=_Quiet(console, label))
            row["methods"][label] = {
                "knn_top1": state.final.get("knn_top1"),
                "curve": [(r["epoch"], r["knn_top1"]) for r in state.history if "knn_top1" in r],
                "seconds": time.perf_counter() - t0,
                "instances_per_s": state.final.get("instances_per_s"),
            }
        row["random_init"] = random_init_knn(spec, device)
        results["variants"][variant] = row
        results["epochs"] = spec.optim.epochs
        results["backbone"] = spec.model.backbone
    results["seconds"] = time.perf_counter() - start
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    (output / "results.md").write_text(markdown_table(results))
    plot_curves(results, output / "accuracy.png")
    console.print(rich_table(results))
    console.print(f"wrote {output / 'results.md'} and {output / 'accuracy.png'} in {results['seconds']:.0f} s")
    return results


def _rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    labels = results["methods"]
    diff = "LeOCLR" in labels and "MoCo-v2" in labels
    head = ["variant", "random init", *labels] + (["LeOCLR - MoCo-v2"] if diff else [])
    rows = []
    for variant, row in results["variants"].items():
        accs = {m: row["methods"][m]["knn_top1"] for m in labels}
        cells = [variant, f"{row['random_init']:.1f}", *(f"{accs[m]:.1f}" for m in labels)]
        if diff:
            cells.append(f"{accs['LeOCLR'] - accs['MoCo-v2']:+.1f}")
        rows.append(cells)
    return head, rows


def markdown_table(results: dict[str, Any]) -> str:
    head, rows = _rows(results)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"\nk-NN top-1 % (offline, k=200, backbone features of the whole image), {results.get('epochs')} epochs, "
            f"backbone {results.get('backbone')}, device {results['device']}, {results['seconds']:.0f} s"
            f"{' (QUICK: not meaningful)' if results['quick'] else ''}.\n")
    return "\n".join(lines) + "\n" + note


def rich_table(results: dict[str, Any]) -> Table:
    head, rows = _rows(results)
    table = Table(*head, title="crop-semantics: k-NN top-1 %")
    for r in rows:
        table.add_row(*r)
    return table


def plot_curves(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.6), squeeze=False)
    for ax, (variant, row) in zip(axes[0], variants.items()):
        for label, m in row["methods"].items():
            xs, ys = zip(*m["curve"]) if m["curve"] else ((), ())
            ax.plot(xs, ys, marker="o", ms=3, label=label)
        ax.axhline(row["random_init"], color="grey", ls="--", lw=1, label="random init")
        ax.set_title(variant)
        ax.set_xlabel("epoch")
        ax.set_ylabel("k-NN top-1 %")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
