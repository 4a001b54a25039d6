"""Job specifications: one pydantic model per job kind, shared by the CLI, the API and Ray.

This module must stay importable without torch (the API process validates specs with it).
Every section forbids unknown fields, so a typo in a YAML file is an error naming the field,
never a knob that silently does nothing.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

# Names the method layer registers (leoclr_core/model.py checks it matches this tuple).
BACKBONES = ("tiny", "resnet18", "resnet34", "resnet50")
METHODS = ("leoclr", "mocov2")
DATA_SOURCES = ("synthetic-objects", "cifar10", "imagefolder", "parquet")
ENCODED_SOURCES = ("imagefolder", "parquet")  # image files' bytes, which a device can decode (`data.decode`)


class SpecError(ValueError):
    """A spec that cannot be run; the message names each offending field and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def _ordered_pair(name: str, low: float, high: float, value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {list(value)}")
    return value


class SyntheticSpec(_Section):
    """The built-in `synthetic-objects` scenes: a labelled shape on clutter, plus distractors."""

    source_size: Annotated[int, Field(ge=16, le=512)] = 64
    num_classes: Annotated[int, Field(ge=2, le=10)] = 10
    object_size: tuple[int, int] = (26, 38)
    distractors: Annotated[int, Field(ge=0, le=4)] = 0
    distractor_size: tuple[int, int] = (12, 20)
    clutter: Annotated[int, Field(ge=0, le=64)] = 12
    # Scales how colourful backgrounds, clutter and objects are. A random colour per image is
    # the easiest instance identity there is: at 1.0 a small model learns colours, not shapes.
    chroma: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0

    @model_validator(mode="after")
    def _sizes_fit(self) -> "SyntheticSpec":
        for name in ("object_size", "distractor_size"):
            lo, hi = getattr(self, name)
            if not (4 <= lo <= hi <= self.source_size):
                raise ValueError(
                    f"{name} must satisfy 4 <= low <= high <= source_size ({self.source_size}), got {[lo, hi]}"
                )
        return self


class DataSpec(_Section):
    source: Literal["synthetic-objects", "cifar10", "imagefolder", "parquet"] = "synthetic-objects"
    path: str | None = None  # a local path; on Ray, image folders and Parquet may be s3:// or gs:// URIs
    image_column: str = "image"  # parquet: the column of encoded image bytes
    label_column: str | None = "label"  # parquet: the label column (absent or null: unlabelled)
    num_images: PositiveInt | None = 5000
    num_test_images: Annotated[int, Field(ge=0)] = 1000
    image_size: Annotated[int, Field(ge=8, le=1024)] = 32
    seed: int = 0
    labelled: bool = True
    synthetic: SyntheticSpec = SyntheticSpec()
    # Where the JPEGs of an image folder or Parquet source are decoded: "gpu" on the training
    # device, whatever it is (nvJPEG on CUDA; loader workers or Ray Data tasks only read the
    # files), which also makes the views there; "cpu" in the loader workers or Ray Data tasks;
    # "auto" = gpu when the training device is a GPU that makes the views.
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    # ImageNet statistics are a fine default for any natural-ish image source.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @model_validator(mode="after")
    def _path_when_needed(self) -> "DataSpec":
        if self.source != "synthetic-objects" and not self.path:
            raise ValueError(f"path is required for source '{self.source}'")
        if self.decode == "gpu" and self.source not in ENCODED_SOURCES:
            raise ValueError(f"decode 'gpu' is for sources of encoded images ({', '.join(ENCODED_SOURCES)}), "
                             f"not '{self.source}'")
        if self.source == "synthetic-objects" and self.num_images is None:
            raise ValueError("num_images is required for source 'synthetic-objects'")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {list(self.std)}")
        return self


class ModelSpec(_Section):
    backbone: Literal["tiny", "resnet18", "resnet34", "resnet50"] = "tiny"
    cifar_stem: bool = True
    width: Annotated[int, Field(ge=4, le=512)] = 32  # channels of the first stage of `tiny`
    proj_hidden_dim: PositiveInt = 512
    proj_dim: PositiveInt = 128


class LossSpec(_Section):
    temperature: Annotated[float, Field(ge=0.01, le=10.0)] = 0.2
    queue_size: Annotated[int, Field(ge=0)] = 4096
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.99
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    # [choice] LEOCLR.md: which crop keys enter the queue after the step.
    enqueue: Literal["both", "k1"] = "both"
    # mocov2: add l(f_q(X2), f_k(X1)). leoclr: also pull f_q(crop) toward f_k(X), so the
    # query encoder sees crops too (not in the paper; a knob to measure).
    symmetric: bool = False
    # How the key encoder's batch norm is kept from leaking: shuffle across workers when
    # distributed, split into sub-batches (after a shuffle) on one worker.
    key_bn: Literal["auto", "shuffle", "split", "none"] = "auto"
    bn_splits: PositiveInt = 8


class AugmentSpec(_Section):
    """MoCo-v2's photometric recipe, drawn independently per view (LEOCLR.md)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: Annotated[float, Field(ge=0.0)] = 0.4
    contrast: Annotated[float, Field(ge=0.0)] = 0.4
    saturation: Annotated[float, Field(ge=0.0)] = 0.4
    hue: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    jitter_p: Probability = 0.8
    grayscale_p: Probability = 0.2
    blur_p: Probability = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: Probability = 0.5
    # Photometric augmentation (jitter, grayscale, blur) on the original X; flip is separate.
    original_photometric: bool = True
    original_flip: bool = True
    # Where views are made: "cpu" in DataLoader workers (per sample, torchvision v2),
    # "gpu" batched on the training device, "auto" = gpu when the device is CUDA.
    device: Literal["auto", "cpu", "gpu"] = "auto"
    # Run the batched implementation even when augmenting on the CPU (much faster for small images).
    batched: bool = False

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {list(v)}")
        return v

    @field_validator("crop_ratio")
    @classmethod
    def _ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 < lo <= hi):
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {list(v)}")
        return v

    @field_validator("blur_sigma")
    @classmethod
    def _sigma(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair("blur_sigma", 1e-3, 100.0, v)


class OptimSpec(_Section):
    epochs: PositiveInt = 20
    batch_size: Annotated[int, Field(ge=2)] = 256
    lr: Annotated[float, Field(gt=0.0, le=100.0)] = 0.06
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _warmup(self) -> "OptimSpec":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs})")
        return self


class ScalingSpec(_Section):
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA
    compile: bool = False
    loader_workers: Annotated[int, Field(ge=0, le=64)] = 0
    log_every: PositiveInt = 10  # steps between reading the loss back from the device
    # Ray only: the Ray Data actor pool that decodes and augments (its size bounds the CPU it takes),
    # and how the training workers are placed (STRICT_SPREAD: one worker per node).
    data_workers: Annotated[int, Field(ge=1, le=1024)] = 1
    data_cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    # tasks: Ray's pooled worker processes (warm across epochs); actors: a map_batches actor pool,
    # which Ray Data starts afresh every epoch (a process start and a torch import each time).
    data_compute: Literal["tasks", "actors"] = "tasks"
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class EvalSpec(_Section):
    knn_every: Annotated[int, Field(ge=0)] = 5  # epochs; 0 = only at the end
    knn_k: PositiveInt = 200
    knn_temperature: Annotated[float, Field(gt=0.0)] = 0.1
    linear_probe: bool = False
    probe_epochs: PositiveInt = 100
    probe_lr: Annotated[float, Field(gt=0.0)] = 0.1


class CheckpointSpec(_Section):
    every: PositiveInt = 1  # epochs
    keep: PositiveInt = 2
    resume: bool = True  # continue from the newest checkpoint in the output folder
    # Ray only: worker failures survived by restarting from the newest checkpoint (-1: no limit).
    max_failures: Annotated[int, Field(ge=-1)] = 3
    # Ray only: where Ray Train keeps checkpoints; every node must reach it (NFS, s3://, gs://)
    # when workers span nodes. Default: <LEOCLR_DATA_DIR>/ray.
    storage_path: str | None = None
    log_to_mlflow: bool = True  # also copy each checkpoint into the MLflow run's artifacts


class RegisterSpec(_Section):
    model_name: str | None = None
    alias: str = "candidate"

    @field_validator("model_name", "alias")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError("must be 1-100 letters, digits, '_', '.', '-', starting with a letter or digit")
        return v


_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


class _JobSpec(_Section):
    name: str = "job"
    seed: int = 0
    output_dir: str | None = None  # default: runs/<name>

    @field_validator("name")
    @classmethod
    def _job_name(cls, v: str) -> str:
        if not re.fullmatch(_NAME, v):
            raise ValueError("must be 1-64 letters, digits, '_', '.', '-', starting with a letter or digit")
        return v

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


# `register` is the design's section name; pydantic warns that it shadows ABC.register, unused here.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class PretrainSpec(_JobSpec):
    kind: Literal["pretrain"] = "pretrain"
    method: Literal["leoclr", "mocov2"] = "leoclr"
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    loss: LossSpec = LossSpec()
    augment: AugmentSpec = AugmentSpec()
    optim: OptimSpec = OptimSpec()
    scaling: ScalingSpec = ScalingSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    register: RegisterSpec = RegisterSpec()

    @model_validator(mode="after")
    def _consistent(self) -> "PretrainSpec":
        n = self.data.num_images
        if n is not None and self.loss.queue_size > n:
            # A key of the same image would sit in the queue: a false negative for its own positive.
            raise ValueError(
                f"loss.queue_size ({self.loss.queue_size}) exceeds data.num_images ({n}); "
                "the queue would hold keys of the very images it is contrasted with"
            )
        if n is not None and self.optim.batch_size > n:
            raise ValueError(f"optim.batch_size ({self.optim.batch_size}) exceeds data.num_images ({n})")
        if self.data.decode == "gpu" and self.augment.device == "cpu":
            raise ValueError("data.decode 'gpu' needs views made on the device: augment.device 'gpu' or 'auto'")
        if self.loss.key_bn == "split" and self.optim.batch_size % self.loss.bn_splits:
            raise ValueError(
                f"optim.batch_size ({self.optim.batch_size}) must be divisible by loss.bn_splits "
                f"({self.loss.bn_splits}) for key_bn 'split'"
            )
        return self


class EncoderRef(_Section):
    """Where an evaluate job takes its encoder from: a checkpoint file or folder of a pretrain run."""

    checkpoint: str | None = None
    model_uri: str | None = None  # models:/name@alias or runs:/... (resolved by the tracking layer)

    @model_validator(mode="after")
    def _exactly_one(self) -> "EncoderRef":
        if (self.checkpoint is None) == (self.model_uri is None):
            raise ValueError("give exactly one of checkpoint or model_uri")
        return self


class EvaluateSpec(_JobSpec):
    kind: Literal["evaluate"] = "evaluate"
    encoder: EncoderRef
    data: DataSpec = DataSpec()
    # transfer: k-NN and a linear probe on a dataset other than the one the encoder was trained on,
    # recorded as a transfer result on the model version.
    protocol: Literal["knn", "linear", "both", "transfer"] = "knn"
    eval: EvalSpec = EvalSpec()
    scaling: ScalingSpec = ScalingSpec()


class SearchDim(_Section):
    """One dimension of a search space: `choice`/`grid` over `values`, `uniform`/`loguniform` in [low, high]."""

    type: Literal["choice", "grid", "uniform", "loguniform"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _shape(self) -> "SearchDim":
        if self.type in ("choice", "grid"):
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError(f"{self.type} takes a non-empty 'values' list (and no low/high)")
        else:
            if self.low is None or self.high is None or self.values is not None:
                raise ValueError(f"{self.type} takes 'low' and 'high' (and no values)")
            if not self.low < self.high:
                raise ValueError(f"low ({self.low}) must be below high ({self.high})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self

    def samples(self) -> list[Any]:
        """Values a trial may take that validation can try: every listed value, or both ends."""
        return list(self.values) if self.values is not None else [self.low, self.high]


class SchedulerSpec(_Section):
    type: Literal["asha", "none"] = "asha"
    grace_period: PositiveInt = 1  # epochs every trial runs before it can be stopped
    reduction_factor: Annotated[float, Field(gt=1.0)] = 2.0


# Spec fields a search may not vary: they name the job or where it lives, not how it trains.
UNTUNABLE = ("kind", "name", "output_dir", "register", "checkpoint.storage_path", "checkpoint.resume")


class TuneSpec(_JobSpec):
    """A search: trials of a base pretrain spec with fields drawn from `space` (spec path -> dimension).
    Each trial is a Ray Train run with the base spec's `scaling`; the best trial's encoder is
    registered under `register`."""

    kind: Literal["tune"] = "tune"
    base: PretrainSpec
    space: dict[str, SearchDim]
    num_samples: PositiveInt = 4  # with grid dimensions: repeats of the whole grid
    metric: Literal["knn_top1", "loss"] = "knn_top1"
    mode: Literal["max", "min"] | None = None  # default: max for knn_top1, min for loss
    scheduler: SchedulerSpec = SchedulerSpec()
    search: Literal["random", "optuna"] = "random"
    max_concurrent_trials: PositiveInt = 2
    register: RegisterSpec = RegisterSpec()

    @property
    def direction(self) -> Literal["max", "min"]:
        return self.mode or ("max" if self.metric == "knn_top1" else "min")

    @model_validator(mode="after")
    def _consistent(self) -> "TuneSpec":
        if not self.space:
            raise ValueError("space must name at least one spec field to search")
        for path, dim in self.space.items():
            if path in UNTUNABLE or any(path.startswith(p + ".") for p in UNTUNABLE):
                raise ValueError(f"space.{path}: {path} cannot be searched (it names the job, not how it trains)")
            for value in dim.samples():
                self.trial_spec({path: value}, f"space.{path}")
        if self.search == "optuna" and any(d.type == "grid" for d in self.space.values()):
            raise ValueError("search 'optuna' cannot take grid dimensions; use choice, or search 'random'")
        if self.scheduler.type == "asha" and self.scheduler.grace_period > self.base.optim.epochs:
            raise ValueError(f"scheduler.grace_period ({self.scheduler.grace_period}) exceeds base.optim.epochs "
                             f"({self.base.optim.epochs}): ASHA could never stop a trial")
        if self.metric == "loss" and self.mode == "max":
            raise ValueError("metric 'loss' with mode 'max' would pick the worst trial")
        return self

    def trial_spec(self, config: dict[str, Any], where: str = "trial", name: str | None = None) -> PretrainSpec:
        """The base spec with `config` ({spec path: value}) set; an error names `where` and the field.
        Trials run k-NN every epoch when the search ranks by it, so the scheduler sees each epoch."""
        raw = self.base.model_dump(mode="json")
        raw["register"] = {"model_name": None}
        if name is not None:
            raw["name"] = name
        if self.metric == "knn_top1":
            raw["eval"]["knn_every"] = 1
        for path, value in config.items():
            keys = path.split(".")
            node = raw
            for key in keys[:-1]:
                child = node.get(key)
                if not isinstance(child, dict):
                    raise ValueError(f"{where}: {path} is not a field of a pretrain spec")
                node = child
            if keys[-1] not in node:
                raise ValueError(f"{where}: {path} is not a field of a pretrain spec")
            node[keys[-1]] = value
        try:
            return PretrainSpec.model_validate(raw)
        except ValidationError as err:
            raise ValueError(f"{where}: " + _format_errors(err).removeprefix("invalid job spec:\n  ").strip()) from None


JobSpec = Annotated[Union[PretrainSpec, EvaluateSpec, TuneSpec], Field(discriminator="kind")]
_JOB_ADAPTER: TypeAdapter[PretrainSpec | EvaluateSpec | TuneSpec] = TypeAdapter(JobSpec)
KINDS = ("pretrain", "evaluate", "tune")


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("pretrain", "evaluate", "tune"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "invalid job spec:\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in item:
        raise SpecError(f"override '{item}' must look like section.field=value")
    path, raw = item.split("=", 1)
    keys = [k for k in path.strip().split(".")]
    if not path.strip() or any(not k for k in keys):
        raise SpecError(f"override '{item}' has an empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise SpecError(f"override '{item}': value is not valid YAML ({exc})") from exc
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of `raw` with each `a.b=value` set; unknown paths are caught by validation."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise SpecError(f"override '{item}': {'.'.join(keys[: depth + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def parse_spec(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> PretrainSpec | EvaluateSpec | TuneSpec:
    if not isinstance(raw, dict):
        raise SpecError("invalid job spec: the top level must be a mapping of fields")
    raw = apply_overrides(raw, overrides)
    raw.setdefault("kind", "pretrain")
    if raw["kind"] not in KINDS:
        raise SpecError(f"invalid job spec:\n  kind: unknown kind {raw['kind']!r} (expected one of {', '.join(KINDS)})")
    try:
        return _JOB_ADAPTER.validate_python(raw)
    except ValidationError as err:
        raise SpecError(_format_errors(err)) from None


def read_spec_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read spec file {p}: {exc.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from None
    return data if data is not None else {}


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PretrainSpec | EvaluateSpec | TuneSpec:
    return parse_spec(read_spec_file(path), overrides)


def flatten(spec: BaseModel) -> dict[str, Any]:
    """`{"loss.temperature": 0.2, ...}`: the form MLflow params and tables use."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", spec.model_dump(mode="json"))
    return out
