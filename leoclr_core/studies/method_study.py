"""The method study (issue 22): LeOCLR against MoCo-v2 with error bars, where the lead changes sign,
and controls that tell apart the hypotheses of why.

Design
- Cells: a base point and a sweep of one axis at a time away from it: capacity (`width` of the tiny
  convnet; `depth` = backbone at ResNet scale), budget (`epochs`), and view size (`view`, the
  source image fixed). The base cell is shared by every axis.
- Arms (`ARMS`), each a spec declaration, not a copy of the engine: LeOCLR and MoCo-v2 in every
  cell; three controls in the base cell (or every cell: `controls="all"`); an untrained encoder
  (random-init) as the floor. The controls: LeOCLR whose X is a window of the whole image at the
  crops' scale (`augment.views=[window, crop, crop]`); MoCo-v2 with its query view uncropped
  (`[original, crop]`, LeOCLR with one crop) or its key view uncropped (`[crop, original]`).
- Seeds: each run of seed s sets `seed=s` (model init and views) and `data.seed=s` (the scenes, the
  labelled subset of the fine-tunes and the evaluation crops); arms of one seed are paired.
- Metrics of each run: k-NN and a linear probe on frozen features of the whole image (the paper's
  protocols), k-NN on a fixed seeded set of crops (bank and queries, `evaluation.crops`), the
  whole-minus-crops k-NN gap, and fine-tunes at 1% and 10% of the labels (`evaluation.finetune`).
- Records: `records.jsonl`, one line per finished run (cell, arm, seed, config hash, metrics,
  seconds). A re-run skips the runs found there with the same config (a run cut short resumes from
  its checkpoint); `--report-only` recomputes the outputs from the records alone.
- Outputs: `summary.csv` (mean, SD, n per cell, arm and metric), `differences.csv` (paired
  difference per comparison with a t-based 95% CI over seeds and who leads: a lead is called only
  when the interval excludes 0), `report.md` (the tables and the reading of the hypotheses), and
  `diff-<axis>.png` (LeOCLR - MoCo-v2 against each axis, with the CI as error bars).

Cost (`COST`, docs/method-study.md "Cost"): the default tiny study (8 cells, 3 seeds, 81 runs, 1,200
epochs) took 37 minutes of runs on a 2-core CPU, and the cost model, fitted to those runs, says 36;
`--scale resnet18` runs the same study unchanged on one GPU, estimated at about 1.5 hours on an H200
(from the engine benchmark, not measured). `--dry-run` prints the estimate of what is left.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from rich.console import Console

from leoclr_core.studies.crop_semantics import BASE, VARIANTS

# ---------------------------------------------------------------- declarations
METRICS: dict[str, str] = {
    "knn_top1": "k-NN",
    "knn_crops_top1": "k-NN crops",
    "knn_view_gap": "k-NN whole - crops",
    "linear_top1": "linear",
}


def finetune_metric(fraction: float) -> str:
    """The record key of a fine-tune with `fraction` of the labels: 0.01 -> finetune1pct_top1."""
    return f"finetune{100 * fraction:g}pct_top1".replace(".", "_")


@dataclass(frozen=True)
class Arm:
    overrides: tuple[str, ...]
    what: str
    train: bool = True


ARMS: dict[str, Arm] = {
    "LeOCLR": Arm(("method=leoclr",), "the paper: q = f_q(X), each crop's key pulled toward it"),
    "MoCo-v2": Arm(("method=mocov2",), "the baseline: q = f_q(crop 1), k = f_k(crop 2)"),
    "LeOCLR-window": Arm(("method=leoclr", "augment.views=[window, crop, crop]"),
                         "LeOCLR with X a window of the whole image at the crops' scale"),
    "MoCo-v2-whole-query": Arm(("method=mocov2", "augment.views=[original, crop]"),
                               "MoCo-v2 with the query view uncropped (LeOCLR with one crop)"),
    "MoCo-v2-whole-key": Arm(("method=mocov2", "augment.views=[crop, original]"),
                             "MoCo-v2 with the key view uncropped: crop queries pulled toward the whole image"),
    "random-init": Arm((), "an untrained encoder with the run's seed (the floor)", train=False),
}
MAIN = ("LeOCLR", "MoCo-v2")
CONTROLS = ("LeOCLR-window", "MoCo-v2-whole-query", "MoCo-v2-whole-key")
# Paired comparisons (a - b), in every cell where both arms ran.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("LeOCLR", "MoCo-v2"),
    ("LeOCLR-window", "LeOCLR"),
    ("MoCo-v2-whole-query", "MoCo-v2"),
    ("MoCo-v2-whole-key", "MoCo-v2"),
)
LEAD = ("LeOCLR", "MoCo-v2")


@dataclass(frozen=True)
class Prediction:
    """What a hypothesis predicts for one paired comparison at the base cell: the signs of the
    difference it allows, of "+" / "-" (the CI excludes 0 on that side) and "0" (it holds 0)."""

    comparison: tuple[str, str]
    metric: str
    signs: dict[str, str]  # hypothesis -> the signs it allows, e.g. "+" or "0-"
    why: str


HYPOTHESES = {
    "H1 crop semantics": "the paper: pulling two crops with different content together loses semantics; "
                         "anchoring crops to the whole image avoids it",
    "H2 view match": "LeOCLR's query encoder is trained on the view the evaluation uses (the whole image, "
                     "downscaled more than the crops); MoCo-v2's never sees it",
}
H1, H2 = HYPOTHESES
# Only the comparisons where the two hypotheses predict differently separate them.
PREDICTIONS: tuple[Prediction, ...] = (
    Prediction(LEAD, "knn_crops_top1", {H1: "+", H2: "0-"},
               "evaluated on crops, a better representation still leads; a matched view does not"),
    Prediction(LEAD, "knn_view_gap", {H1: "0", H2: "+"},
               "the lead is larger on whole images than on crops only if it comes from the view"),
    Prediction(("MoCo-v2-whole-key", "MoCo-v2"), "knn_top1", {H1: "+", H2: "0-"},
               "crops pulled toward the whole image (query still on crops) help under H1 alone"),
    Prediction(("LeOCLR-window", "LeOCLR"), "knn_crops_top1", {H1: "-", H2: "+"},
               "an anchor at the crops' scale without the whole content: worse semantics (H1), "
               "a query trained nearer the crop view (H2)"),
)


@dataclass(frozen=True)
class Axis:
    name: str
    field: str  # the spec field it sets
    values: tuple[Any, ...]  # swept values; the base spec's value is one of them
    label: str


@dataclass(frozen=True)
class Scale:
    name: str
    base: dict[str, Any]
    overrides: tuple[str, ...]  # applied to `base` before any cell or arm
    axes: tuple[Axis, ...]
    seeds: int = 3
    label_fractions: tuple[float, ...] = (0.01, 0.1)
    finetune: dict[str, Any] = field(default_factory=lambda: {"epochs": 30, "lr": 0.05, "batch_size": 256})


# The tiny scale: crop_semantics.BASE (tiny convnet, 32 px scenes of muted colour, 16 px views, SGD
# lr 0.06 cosine, queue 1/8 of the data, m 0.99, t 0.2) on the paper's case, one labelled object and
# one distractor of another class, at a size that fits the stated time on 2 cores. Batch 128: the
# same compute per epoch as 256 in twice the steps (at 20 epochs LeOCLR reached 21.0% k-NN with
# batch 256 and 31.6% with 128, one seed each, measured 2026-11-30).
TINY = Scale(
    name="tiny",
    base=BASE,
    overrides=(*VARIANTS["distractor"][1], "data.num_images=4096", "data.num_test_images=1000",
               "loss.queue_size=512", "optim.batch_size=128", "optim.epochs=20", "eval.knn_every=0",
               "eval.linear_probe=true", "checkpoint.every=5"),
    axes=(
        Axis("width", "model.width", (8, 16, 32, 64), "tiny convnet width (channels of the first stage)"),
        Axis("epochs", "optim.epochs", (10, 20, 40), "pretraining epochs"),
        Axis("view", "data.image_size", (12, 16, 24), "view size (px; scenes are 32 px)"),
    ),
)
# ResNet scale: the same recipe at twice the resolution (64 px scenes, 32 px views, objects and
# distractors twice as large) with the preliminary probe's budget (docs/method.md: ResNet-18 CIFAR
# stem, 10,240 scenes, batch 512, queue 4096, 60-150 epochs), where MoCo-v2 led.
RESNET18 = Scale(
    name="resnet18",
    base=BASE,
    overrides=("data.synthetic.source_size=64", "data.synthetic.object_size=[26, 38]",
               "data.synthetic.distractors=1", "data.synthetic.distractor_size=[16, 26]",
               "data.num_images=10240", "data.num_test_images=2000", "data.image_size=32",
               "model.backbone=resnet18", "model.cifar_stem=true", "loss.queue_size=4096",
               "optim.batch_size=512", "optim.epochs=100", "eval.knn_every=0", "eval.linear_probe=true",
               "checkpoint.every=10"),
    axes=(
        Axis("depth", "model.backbone", ("resnet18", "resnet34", "resnet50"), "backbone (CIFAR stem)"),
        Axis("epochs", "optim.epochs", (50, 100, 200), "pretraining epochs"),
        Axis("view", "data.image_size", (24, 32, 48), "view size (px; scenes are 64 px)"),
    ),
)
SCALES = {s.name: s for s in (TINY, RESNET18)}

# --quick: a seconds-long study for tests; its numbers mean nothing.
QUICK_OVERRIDES = (
    "data.num_images=128", "data.num_test_images=60", "model.width=4", "model.proj_hidden_dim=32",
    "model.proj_dim=16", "loss.queue_size=64", "optim.batch_size=64", "optim.epochs=1", "eval.knn_k=20",
    "eval.probe_epochs=2", "checkpoint.every=1",
)
QUICK_AXES = (Axis("width", "model.width", (4, 8), "width"),)
QUICK_FINETUNE = {"epochs": 1, "lr": 0.05, "batch_size": 64}
QUICK_FRACTIONS = (0.1, 0.2)  # of 128 scenes in 10 classes: 1% would be under one image a class

# The cost model behind --dry-run's estimate and the stated time (docs/method-study.md, "Cost").
# epoch_s: seconds of one LeOCLR epoch of `images` scenes at the scale's base config, end to end;
# eval_s: the evaluations and data generation of one run; relative: step cost of other values of a
# field (or of MoCo-v2) against the base, measured step for step.
COST: dict[str, dict[str, Any]] = {
    # tiny, measured here on 2026-11-30 by the study itself (81 runs, 3 seeds, 2 cores): a base LeOCLR
    # epoch 1.28 s (25.6 s for 20); the evaluations of a run 2.9 s on average; the relative costs
    # are mean training seconds of each cell's runs against the base's, LeOCLR for LeOCLR.
    "tiny": {"epoch_s": 1.28, "images": 4096, "eval_s": 2.9, "where": "a 2-core CPU",
             "mocov2": 0.73,
             "relative": {"model.width": {8: 0.64, 16: 1.0, 32: 1.80, 64: 4.88},
                          "data.image_size": {12: 0.78, 16: 1.0, 24: 1.69}}},
    # resnet18: NOT measured. From the H200 engine bench (docs/performance.md: ResNet-18 CIFAR stem,
    # 32 px, batch 512, about 18,000 instances/s end to end eager) and FLOPs for depth and view size;
    # eval_s is dominated by generating 12,240 scenes of 64 px on the host.
    "resnet18": {"epoch_s": 0.57, "images": 10240, "eval_s": 15.0, "where": "one H200 GPU (estimated, not measured)",
                 "mocov2": 0.95,
                 "relative": {"model.backbone": {"resnet18": 1.0, "resnet34": 2.1, "resnet50": 2.5},
                              "data.image_size": {24: 0.56, 32: 1.0, 48: 2.25}}},
}

# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Cell:
    name: str  # "base" or "<axis>=<value>"
    overrides: tuple[str, ...]
    coords: dict[str, Any]  # axis name -> value, for every axis the cell lies on


@dataclass(frozen=True)
class Run:
    cell: Cell
    arm: str
    seed: int

    @property
    def key(self) -> tuple[str, str, int]:
        return self.cell.name, self.arm, self.seed


def _value_text(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def cells_of(axes: Sequence[Axis], base_values: dict[str, Any]) -> list[Cell]:
    """The base cell (on every axis, at its base value) and one cell per other value of each axis."""
    cells = [Cell("base", (), {a.name: base_values[a.name] for a in axes})]
    for a in axes:
        for v in a.values:
            if v != base_values[a.name]:
                cells.append(Cell(f"{a.name}={_value_text(v)}", (f"{a.field}={_value_text(v)}",), {a.name: v}))
    return cells


def plan_runs(cells: Sequence[Cell], seeds: Sequence[int], controls: str = "base") -> list[Run]:
    """Every run, seed by seed (an interrupted study has whole seeds of every cell first), cell by cell."""
    if controls not in ("base", "all", "none"):
        raise ValueError(f"controls must be base, all or none, got {controls!r}")
    runs = []
    for seed in seeds:
        for cell in cells:
            arms = list(MAIN)
            if controls == "all" or (controls == "base" and cell.name == "base"):
                arms += CONTROLS
            arms.append("random-init")
            runs += [Run(cell, arm, seed) for arm in arms]
    return runs


# ---------------------------------------------------------------- statistics
# Two-sided 95% quantiles of Student's t, t(0.975, df) for df = 1..30.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """t(0.975, df): the table up to 30, then the Cornish-Fisher expansion around z (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the SD of one value is nan."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan


@dataclass(frozen=True)
class Paired:
    n: int
    mean: float
    sd: float
    low: float  # the 95% CI of the mean difference (nan with one pair)
    high: float

    @property
    def sign(self) -> str:
        """"+" / "-" when the CI excludes 0 on that side, "0" when it holds 0, "?" with one pair."""
        if self.n < 2 or math.isnan(self.low):
            return "?"
        return "+" if self.low > 0 else "-" if self.high < 0 else "0"


def paired_ci(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Mean of a_i - b_i over pairs with a t-based 95% interval: mean +- t(0.975, n-1) sd / sqrt(n)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m, sd = mean_sd(d)
    if len(d) < 2:
        return Paired(len(d), m, sd, math.nan, math.nan)
    half = t975(len(d) - 1) * sd / math.sqrt(len(d))
    return Paired(len(d), m, sd, m - half, m + half)


def lead_of(p: Paired, a: str, b: str) -> str:
    return {"+": a, "-": b, "0": "none (CI holds 0)", "?": "n/a (one seed)"}[p.sign]


# ---------------------------------------------------------------- records
def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete line of records.jsonl (a line cut short by a kill is ignored)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def record_key(record: dict[str, Any]) -> tuple[tuple[str, str, int], str]:
    return (record["cell"], record["arm"], int(record["seed"])), record["config"]


def pending(runs: Sequence[Run], configs: dict[tuple[str, str, int], str],
            records: Iterable[dict[str, Any]]) -> list[Run]:
    """The runs with no record of the same cell, arm, seed and config (a changed config runs again)."""
    done = {record_key(r) for r in records}
    return [r for r in runs if (r.key, configs[r.key]) not in done]


def current(records: Iterable[dict[str, Any]], configs: dict[tuple[str, str, int], str]) -> list[dict[str, Any]]:
    """The records of the planned runs with their current config, the newest of each."""
    latest: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in records:
        key, config = record_key(r)
        if configs.get(key) == config:
            latest[key] = r
    return list(latest.values())


# ---------------------------------------------------------------- one run
def config_hash(spec_json: dict[str, Any], evaluation: dict[str, Any]) -> str:
    """What makes a run's result: its spec (less its name and folder) and the study's evaluation."""
    body = {k: v for k, v in spec_json.items() if k not in ("name", "output_dir")}
    blob = json.dumps({"spec": body, "eval": evaluation}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


class Study:
    """A planned study: its scale, cells, runs, each run's spec and config, and where it writes."""

    def __init__(self, output: Path, *, scale: str = "tiny", quick: bool = False, seeds: int | None = None,
                 axes: Sequence[str] | None = None, controls: str = "base", overrides: Sequence[str] = (),
                 device: str | None = None):
        from leoclr_core.spec.models import PretrainSpec, parse_spec

        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
        self.scale, self.quick, self.output = SCALES[scale], quick, Path(output)
        self.extra = (*self.scale.overrides, *(QUICK_OVERRIDES if quick else ()), *overrides)
        all_axes = QUICK_AXES if quick else self.scale.axes
        names = list(axes) if axes else [a.name for a in all_axes]
        unknown = [n for n in names if n not in {a.name for a in all_axes}]
        if unknown:
            raise ValueError(f"unknown axis {unknown}; known: {', '.join(a.name for a in all_axes)}")
        self.axes = [a for a in all_axes if a.name in names]
        n_seeds = seeds if seeds is not None else (2 if quick else self.scale.seeds)
        if n_seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {n_seeds}")
        self.seeds = list(range(n_seeds))
        self.fractions = QUICK_FRACTIONS if quick else self.scale.label_fractions
        self.finetune = QUICK_FINETUNE if quick else self.scale.finetune
        base = parse_spec(self.scale.base, list(self.extra))
        assert isinstance(base, PretrainSpec)
        base_json = base.model_dump(mode="json")
        base_values = {}
        for a in self.axes:
            node: Any = base_json
            for part in a.field.split("."):
                node = node[part]
            base_values[a.name] = node
        self.cells = cells_of(self.axes, base_values)
        self.runs = plan_runs(self.cells, self.seeds, controls)
        self.controls = controls
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.evaluation = {"crops": {"scale": [0.2, 1.0], "ratio": [3 / 4, 4 / 3], "seed": "data.seed"},
                           "finetune": self.finetune, "label_fractions": list(self.fractions)}
        self.specs: dict[tuple[str, str, int], PretrainSpec] = {}
        self.configs: dict[tuple[str, str, int], str] = {}
        for run in self.runs:
            spec = self._spec(run)
            self.specs[run.key] = spec
            self._check_fractions(spec)
            evaluation = {**self.evaluation, "trained": ARMS[run.arm].train}
            self.configs[run.key] = config_hash(spec.model_dump(mode="json"), evaluation)

    def _check_fractions(self, spec) -> None:
        """Refuse, before any training, label fractions that give a class less than one image."""
        from leoclr_core.spec.models import check_label_fraction

        d = spec.data
        if d.source == "synthetic-objects" and d.num_images is not None:
            smallest = d.num_images // d.synthetic.num_classes
            for fraction in self.fractions:
                check_label_fraction(fraction, smallest, f"the smallest class of data.num_images {d.num_images}")

    @property
    def records_path(self) -> Path:
        return self.output / "records.jsonl"

    def _spec(self, run: Run):
        from leoclr_core.spec.models import parse_spec

        arm = ARMS[run.arm]
        overrides = [*self.extra, *run.cell.overrides, *arm.overrides, f"seed={run.seed}", f"data.seed={run.seed}"]
        spec = parse_spec(self.scale.base, overrides)
        # The folder holds the config's hash: a changed config never resumes another's checkpoint.
        cfg = config_hash(spec.model_dump(mode="json"), {})[:8]
        name = _safe(f"{run.cell.name}-{run.arm}-s{run.seed}")[:50]
        return parse_spec(self.scale.base, [*overrides, f"name={name}",
                                            f"output_dir={self.output / 'runs' / f'{name}-{cfg}'}"])

    def epochs(self, runs: Sequence[Run]) -> int:
        return sum(self.specs[r.key].optim.epochs for r in runs if ARMS[r.arm].train)

    def estimate_seconds(self, runs: Sequence[Run]) -> float:
        """The cost model's seconds for `runs` (`COST`; quick runs are estimated as if full size)."""
        cost = COST[self.scale.name]
        total = 0.0
        for r in runs:
            spec = self.specs[r.key]
            size = (spec.data.num_images or cost["images"]) / cost["images"]
            total += cost["eval_s"] * size
            if not ARMS[r.arm].train:
                continue
            factor = cost["mocov2"] if spec.method == "mocov2" else 1.0
            dumped = spec.model_dump(mode="json")
            for path, table in cost["relative"].items():
                node: Any = dumped
                for part in path.split("."):
                    node = node[part]
                factor *= table.get(node, 1.0)
            total += spec.optim.epochs * size * cost["epoch_s"] * factor
        return total


_SOURCES: dict[str, Any] = {}  # the last data spec's splits: the arms of one cell and seed share them


def _sources(data) -> tuple[Any, Any]:
    from leoclr_core.training.feed import job_source

    key = data.model_dump_json()
    if key not in _SOURCES:
        _SOURCES.clear()
        _SOURCES[key] = job_source(data, "train"), job_source(data, "test")
    return _SOURCES[key]


def evaluate_run(spec, backbone: torch.nn.Module, fractions: Sequence[float], finetune_cfg: dict[str, Any],
                 device: str, whole: dict[str, float] | None = None) -> dict[str, float]:
    """Every metric of the study for a backbone: k-NN and linear on whole images (`whole` when the
    pretraining already measured them), k-NN on crops, and a fine-tune per label fraction."""
    from leoclr_core.evaluation.crops import knn_on_crops
    from leoclr_core.evaluation.finetune import finetune
    from leoclr_core.evaluation.probes import evaluate_backbone
    from leoclr_core.spec.models import FinetuneSpec
    from leoclr_core.training.engine import resolve_runtime

    runtime = resolve_runtime(spec.scaling, device)
    backbone = backbone.to(runtime.device)
    d, e = spec.data, spec.eval
    train_set, test_set = _sources(d)
    common = dict(num_classes=train_set.num_classes, size=d.image_size, mean=d.mean, std=d.std)
    metrics: dict[str, float] = dict(whole or {})
    if "knn_top1" not in metrics or "linear_top1" not in metrics:
        r = evaluate_backbone(backbone, train_set, test_set, runtime, knn=True, linear=True, k=e.knn_k,
                              knn_temperature=e.knn_temperature, probe_epochs=e.probe_epochs,
                              probe_lr=e.probe_lr, **common)
        metrics.update(r.as_metrics())
    metrics["knn_crops_top1"] = knn_on_crops(backbone, train_set, test_set, runtime, k=e.knn_k,
                                             temperature=e.knn_temperature, seed=d.seed, **common)
    metrics["knn_view_gap"] = metrics["knn_top1"] - metrics["knn_crops_top1"]
    for fraction in fractions:
        ft = FinetuneSpec(label_fraction=fraction, **finetune_cfg)
        result = finetune(backbone, train_set, test_set, runtime, ft, subset_seed=d.seed, seed=spec.seed, **common)
        metrics[finetune_metric(fraction)] = result.top1
    return metrics


def _progress(console: Console | None, label: str):
    """Callbacks that print a run's loss four times over its epochs (long runs show they move)."""
    from leoclr_core.training.callbacks import Callbacks

    class Progress(Callbacks):
        def on_epoch(self, record, state) -> None:
            every = max(1, state.epochs // 4)
            if console is not None and (record["epoch"] % every == 0 or record["epoch"] == state.epochs):
                console.print(f"  {label}: epoch {record['epoch']}/{state.epochs} loss {record['loss']:.3f} "
                              f"{record['instances_per_s']:.0f} inst/s")

    return Progress()


def run_one(study: Study, run: Run, console: Console | None = None) -> dict[str, Any]:
    """Train (unless the arm is random-init) and evaluate one run; returns its record."""
    from leoclr_core.nn.model import build_backbone
    from leoclr_core.training.checkpoint import load_backbone
    from leoclr_core.training.pretrain import pretrain

    spec = study.specs[run.key]
    t0 = time.perf_counter()
    whole = None
    if ARMS[run.arm].train:
        label = f"{run.cell.name} {run.arm} seed {run.seed}"
        state = pretrain(spec, device=study.device, callbacks=_progress(console, label))
        whole = {k: float(state.final[k]) for k in ("knn_top1", "linear_top1") if state.final.get(k) is not None}
        backbone, _ = load_backbone(spec.out_dir / "encoder.pt")
    else:
        torch.manual_seed(spec.seed)
        backbone, _ = build_backbone(spec.model)
    t1 = time.perf_counter()
    metrics = evaluate_run(spec, backbone, study.fractions, study.finetune, study.device, whole)
    t2 = time.perf_counter()
    shutil.rmtree(spec.out_dir / "checkpoints", ignore_errors=True)  # recorded: the encoder is kept
    return {
        "cell": run.cell.name, "coords": run.cell.coords, "arm": run.arm, "seed": run.seed,
        "config": study.configs[run.key], "scale": study.scale.name, "quick": study.quick,
        "epochs": spec.optim.epochs if ARMS[run.arm].train else 0, "metrics": metrics,
        "seconds": t2 - t0, "train_seconds": t1 - t0, "eval_seconds": t2 - t1, "device": study.device,
        # Relative to the study folder, so the records stay true when the folder is moved or published.
        "run_dir": Path(spec.out_dir).relative_to(study.output).as_posix(), "finished_at": time.time(),
    }


# ---------------------------------------------------------------- summary
def metric_names(records: Iterable[dict[str, Any]]) -> list[str]:
    seen: list[str] = [m for m in METRICS]
    for r in records:
        for k in r["metrics"]:
            if k not in seen:
                seen.append(k)
    present = {k for r in records for k in r["metrics"]}
    return [m for m in seen if m in present]


def metric_label(key: str) -> str:
    if key in METRICS:
        return METRICS[key]
    if key.startswith("finetune") and key.endswith("pct_top1"):
        return f"fine-tune {key[len('finetune'):-len('pct_top1')].replace('_', '.')}%"
    return key


def summarize(records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per cell, arm and metric: n, mean, sd; per cell, comparison and metric: the paired difference)."""
    metrics = metric_names(records)
    by: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    coords: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for r in records:
        by.setdefault((r["cell"], r["arm"]), {})[int(r["seed"])] = r["metrics"]
        coords[r["cell"]] = r.get("coords", {})
        if r["cell"] not in order:
            order.append(r["cell"])
    order.sort(key=lambda c: (c != "base", c))
    summary, diffs = [], []
    for cell in order:
        for arm in ARMS:
            runs = by.get((cell, arm))
            if not runs:
                continue
            for m in metrics:
                vals = [v[m] for v in runs.values() if m in v]
                if vals:
                    mean, sd = mean_sd(vals)
                    summary.append({"cell": cell, "coords": coords[cell], "arm": arm, "metric": m,
                                    "n": len(vals), "mean": mean, "sd": sd})
        for a, b in COMPARISONS:
            ra, rb = by.get((cell, a)), by.get((cell, b))
            if not ra or not rb:
                continue
            seeds = sorted(set(ra) & set(rb))
            for m in metrics:
                pairs = [(ra[s][m], rb[s][m]) for s in seeds if m in ra[s] and m in rb[s]]
                if not pairs:
                    continue
                p = paired_ci([x for x, _ in pairs], [y for _, y in pairs])
                diffs.append({"cell": cell, "coords": coords[cell], "a": a, "b": b, "metric": m, "n": p.n,
                              "mean": p.mean, "sd": p.sd, "ci_low": p.low, "ci_high": p.high,
                              "sign": p.sign, "lead": lead_of(p, a, b)})
    return summary, diffs


def read_hypotheses(diffs: Sequence[dict[str, Any]], cell: str = "base") -> list[dict[str, Any]]:
    """Each prediction against the observed sign at `cell`: which hypotheses it agrees with."""
    rows = []
    for p in PREDICTIONS:
        found = [d for d in diffs if d["cell"] == cell and (d["a"], d["b"]) == p.comparison and d["metric"] == p.metric]
        sign = found[0]["sign"] if found else "?"
        agrees = [h for h, s in p.signs.items() if sign != "?" and sign in s]
        rows.append({"prediction": p, "observed": found[0] if found else None, "sign": sign, "agrees": agrees})
    return rows


def _agreement(row: dict[str, Any]) -> str:
    if row["sign"] in ("+", "-"):
        return ", ".join(row["agrees"]) or "neither"
    if row["sign"] == "0":
        return "undecided (fits " + (", ".join(row["agrees"]) or "neither") + ")"
    return "-"


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One line per hypothesis, by the standard a lead is called by: a prediction is met or
    contradicted only by an interval that excludes 0; an interval holding 0 decides nothing (it is
    also what too few seeds give), so those are counted apart, with how many a 0 would fit."""
    lines = []
    for h in HYPOTHESES:
        decisive = [r for r in rows if r["sign"] in ("+", "-")]
        met = sum(1 for r in decisive if h in r["agrees"])
        held = [r for r in rows if r["sign"] == "0"]
        fits = sum(1 for r in held if h in r["agrees"])
        lines.append(f"- {h}: {met} met and {len(decisive) - met} contradicted by an interval that excludes 0; "
                     f"{len(held)} undecided (the interval holds 0; a 0 is what {fits} of them predict); "
                     f"{len(rows) - len(decisive) - len(held)} not run or one seed")
    return "\n".join(lines)


def _fmt(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def write_csvs(output: Path, summary: Sequence[dict[str, Any]], diffs: Sequence[dict[str, Any]]) -> None:
    with (output / "summary.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["cell", "coords", "arm", "metric", "n", "mean", "sd"])
        for s in summary:
            w.writerow([s["cell"], json.dumps(s["coords"]), s["arm"], s["metric"], s["n"], s["mean"], s["sd"]])
    with (output / "differences.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["cell", "coords", "comparison", "metric", "n", "mean_diff", "sd_diff", "ci95_low",
                    "ci95_high", "lead"])
        for d in diffs:
            w.writerow([d["cell"], json.dumps(d["coords"]), f"{d['a']} - {d['b']}", d["metric"], d["n"], d["mean"],
                        d["sd"], d["ci_low"], d["ci_high"], d["lead"]])


def markdown_report(study: Study, records: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]],
                    diffs: Sequence[dict[str, Any]]) -> str:
    metrics = metric_names(records)
    cells = []
    for s in summary:
        if s["cell"] not in cells:
            cells.append(s["cell"])
    seconds = sum(r["seconds"] for r in records)
    out = [f"# Method study, scale {study.scale.name}{' (QUICK: numbers not meaningful)' if study.quick else ''}",
           "",
           f"{len(records)} runs recorded of {len(study.runs)} planned, seeds {study.seeds}, device "
           f"{study.device}, {seconds / 60:.1f} min of runs. Metrics: top-1 % on the test split "
           "(k-NN k={k} t=0.1 and a linear probe on frozen backbone features of the whole image; k-NN on a "
           "fixed seeded crop per image, bank and queries; fine-tunes with a fraction of the labels).".replace(
               "{k}", str(study.specs[study.runs[0].key].eval.knn_k)),
           "", "Arms (the same engine, data, budget and seed; controls are spec declarations):", "",
           *(f"- **{name}**: {arm.what}" + (f" (`{', '.join(arm.overrides)}`)" if arm.overrides else "")
             for name, arm in ARMS.items()),
           "", "## Mean (SD) per arm", ""]
    head = ["cell", "arm", *(metric_label(m) for m in metrics)]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for s in summary:
        table.setdefault((s["cell"], s["arm"]), {})[s["metric"]] = s
    for (cell, arm), row in table.items():
        vals = [f"{_fmt(row[m]['mean'])} ({_fmt(row[m]['sd'])})" if m in row else "" for m in metrics]
        out.append(f"| {cell} | {arm} (n={max(r['n'] for r in row.values())}) | " + " | ".join(vals) + " |")
    out += ["", "## Paired differences, mean [95% CI] over seeds", "",
            "A lead is called only when the interval excludes 0.", ""]
    head = ["cell", "comparison", *(metric_label(m) for m in metrics)]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dtable: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for d in diffs:
        dtable.setdefault((d["cell"], f"{d['a']} - {d['b']}"), {})[d["metric"]] = d
    for (cell, comp), row in dtable.items():
        vals = []
        for m in metrics:
            d = row.get(m)
            vals.append("" if d is None else f"{_fmt(d['mean'], True)} [{_fmt(d['ci_low'], True)}, "
                        f"{_fmt(d['ci_high'], True)}]{'' if d['sign'] in '0?' else ' *'}")
        out.append(f"| {cell} | {comp} | " + " | ".join(vals) + " |")
    out += ["", "`*`: the interval excludes 0.", "", "## Hypotheses (base cell)", ""]
    out += [f"- **{h}**: {text}" for h, text in HYPOTHESES.items()]
    out += ["", "| comparison | metric | " + " | ".join(HYPOTHESES) + " | observed | agrees with | why |",
            "|" + "---|" * (5 + len(HYPOTHESES))]
    rows = read_hypotheses(diffs)
    for r in rows:
        p, o = r["prediction"], r["observed"]
        obs = "not run" if o is None else f"{_fmt(o['mean'], True)} [{_fmt(o['ci_low'], True)}, {_fmt(o['ci_high'], True)}]"
        out.append(f"| {p.comparison[0]} - {p.comparison[1]} | {metric_label(p.metric)} | "
                   + " | ".join(" or ".join(p.signs[h]) for h in HYPOTHESES)
                   + f" | {obs} ({r['sign']}) | {_agreement(r)} | {p.why} |")
    out += ["", "Signs: + / - the 95% interval excludes 0 on that side; 0 it holds 0; ? one seed.", "",
            verdict(rows), ""]
    return "\n".join(out)


def plot_differences(study: Study, diffs: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[Path]:
    """diff-<axis>.png: LeOCLR - MoCo-v2 against the axis, one panel per metric, 95% CI as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    base = next(c for c in study.cells if c.name == "base").coords
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    for axis in study.axes:
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
        for ax in axes.flat[len(metrics):]:
            ax.set_visible(False)
        for ax, m in zip(axes.flat, metrics):
            pts = [(d["coords"][axis.name], d) for d in diffs
                   if (d["a"], d["b"]) == LEAD and d["metric"] == m and axis.name in d["coords"]]
            pts.sort(key=lambda p: axis.values.index(p[0]) if p[0] in axis.values else 0)
            xs = list(range(len(pts)))
            ys = [d["mean"] for _, d in pts]
            err = [[0 if math.isnan(d["ci_low"]) else d["mean"] - d["ci_low"] for _, d in pts],
                   [0 if math.isnan(d["ci_high"]) else d["ci_high"] - d["mean"] for _, d in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4)
            ax.axhline(0, color="grey", lw=1, ls="--")
            ax.set_xticks(xs, [f"{v}{' (base)' if v == base.get(axis.name) else ''}" for v, _ in pts], fontsize=8)
            ax.set_xlabel(axis.label, fontsize=8)
            ax.set_title(metric_label(m), fontsize=9)
            ax.grid(alpha=0.3)
        for row in axes:
            row[0].set_ylabel("LeOCLR - MoCo-v2 (points)", fontsize=8)
        fig.suptitle(f"LeOCLR - MoCo-v2 against {axis.name}, mean and 95% CI over seeds", fontsize=10)
        fig.tight_layout()
        path = study.output / f"diff-{axis.name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(study: Study, console: Console | None = None) -> dict[str, Any]:
    """Recompute every output from records.jsonl (only the records of this plan's runs and configs)."""
    records = current(read_records(study.records_path), study.configs)
    study.output.mkdir(parents=True, exist_ok=True)
    summary, diffs = summarize(records)
    write_csvs(study.output, summary, diffs)
    (study.output / "report.md").write_text(markdown_report(study, records, summary, diffs))
    plots = plot_differences(study, diffs, metric_names(records)) if records else []
    if console is not None:
        console.print(f"wrote {study.output / 'report.md'}, summary.csv, differences.csv and {len(plots)} plot(s)")
    return {"records": records, "summary": summary, "differences": diffs, "plots": plots}


def run_study(output: Path, *, scale: str = "tiny", quick: bool = False, seeds: int | None = None,
              axes: Sequence[str] | None = None, controls: str = "base", overrides: Sequence[str] = (),
              device: str | None = None, report_only: bool = False, dry_run: bool = False,
              console: Console | None = None) -> dict[str, Any]:
    """Run every pending run of the study (resuming), then write the outputs."""
    console = console or Console(stderr=True)
    study = Study(output, scale=scale, quick=quick, seeds=seeds, axes=axes, controls=controls,
                  overrides=overrides, device=device)
    todo = pending(study.runs, study.configs, read_records(study.records_path))
    console.print(f"method study ({study.scale.name}{', quick' if quick else ''}): {len(study.cells)} cells, "
                  f"{len(study.runs)} runs ({study.epochs(study.runs)} epochs), {len(todo)} to run "
                  f"({study.epochs(todo)} epochs) on {study.device}; estimated "
                  f"{study.estimate_seconds(todo) / 60:.0f} min on {COST[study.scale.name]['where']}")
    if dry_run:
        for run in todo:
            console.print(f"  {run.cell.name:<14} {run.arm:<20} seed {run.seed}  {study.configs[run.key]}")
        return {"study": study, "pending": todo}
    if not report_only:
        start = time.perf_counter()
        for i, run in enumerate(todo, 1):
            rec = run_one(study, run, console)
            append_record(study.records_path, rec)
            m = rec["metrics"]
            left = (time.perf_counter() - start) / i * (len(todo) - i)
            console.print(f"[{i}/{len(todo)}] {run.cell.name} {run.arm} seed {run.seed}: k-NN {m['knn_top1']:.1f} "
                          f"crops {m['knn_crops_top1']:.1f} linear {m.get('linear_top1', math.nan):.1f} "
                          f"({rec['seconds']:.0f} s, about {left / 60:.0f} min left)")
    result = write_outputs(study, console)
    result["study"] = study
    return result
