"""Job specifications: one pydantic model per job kind, shared by the CLI, the API and Ray.

This module must stay importable without torch (the API process validates specs with it).
Every section forbids unknown fields, so a typo in a YAML file is an error naming the field,
never a knob that silently does nothing. Every number has an upper bound in the JSON schema (so in
the API's OpenAPI document too) and must be finite; docs/job-specs.md lists every field with its
type, default and bounds (`python -m leoclr_core.spec.reference` regenerates it).
"""

from __future__ import annotations

import json
import math
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

# Names the method layer registers (leoclr_core/nn/model.py checks it matches this tuple).
BACKBONES = ("tiny", "resnet18", "resnet34", "resnet50")
METHODS = ("leoclr", "mocov2")
# What a view is (leoclr_core/views/batched.py makes each): "original" the whole image square-resized,
# "crop" a random resized crop, "window" the whole image resized at a crop's scale with a view-sized
# window cut from it (a control: the crops' scale and the whole image's aspect, not all its content).
VIEW_KINDS = ("original", "crop", "window")
# The views each method takes, slot by slot (leoclr_core/nn/methods.py checks its classes match).
METHOD_VIEWS = {"leoclr": ("original", "crop", "crop"), "mocov2": ("crop", "crop")}
DATA_SOURCES = ("synthetic-objects", "cifar10", "imagefolder", "parquet")
ENCODED_SOURCES = ("imagefolder", "parquet")  # image files' bytes, which a device can decode (`data.decode`)


class SpecError(ValueError):
    """A spec that cannot be run; the message names each offending field and why."""


# Upper bounds of the fields that size work. Each is far above any real run, so it refuses only a
# spec that could never finish (a few zeros too many, a fuzzed request), never one that could.
MAX_SEED = 2**32 - 1  # numpy's RandomState (Tune's random search is seeded with `seed`) takes 0..2**32-1
MAX_IMAGES = 10**9  # ~70x ImageNet-21k (14.2M); one epoch of 10**9 images at 10k images/s takes 28 h
MAX_EPOCHS = 100_000  # ~30x the longest published self-supervised schedules (1000-3200 epochs)
MAX_BATCH = 2**17  # 4x SimCLR's largest batch (32768); the global batch, split over the workers
MAX_DIM = 2**16  # 8x the widest published projectors (VICReg, Barlow Twins: 8192)
MAX_QUEUE = 2**24  # 256x MoCo's 65536 keys; already 8 GiB of 128-d fp32 keys on every worker
MAX_WORKERS = 4096  # 4x a 1024-GPU run; every worker (and every trial) is a process Ray must place
# Per worker, and Ray never splits a worker over nodes: more than the largest machines have
# (768 hardware threads; 16 GPUs in a DGX-2) could never be placed.
MAX_NODE_CPUS = 1024
MAX_NODE_GPUS = 16
MAX_STEPS = 1_000_000  # log_every: 18x the steps of an ImageNet-21k epoch at batch 256 (55k)
MAX_KNN_K = 2**16  # 300x the usual k (200); the vote's top-k of 1024 queries is 0.75 GiB at this k
MAX_BN_SPLITS = 1024  # MoCo splits in 8; 1024 sub-batches of the largest batch still hold 128 images
MAX_FAILURES = 10_000  # -1 already means "no limit"; a run restarted 10k times is failing, not recovering
MAX_TRIALS = 100_000  # 100x the largest searches in practice; Tune's driver holds every trial's state
MAX_CHOICES = 1024  # values of one choice/grid dimension; a wider range is a uniform/loguniform one
MAX_TEMPERATURE = 10.0  # 50-100x the usual 0.1-0.2; beyond it the similarities no longer matter
MAX_LR = 100.0  # 3x the largest learning rate in practice (MoCo's linear probe: 30)
MAX_WEIGHT_DECAY = 1.0  # 10x AdamW's largest (0.1); at lr 1 it would zero the weights every step
MAX_JITTER = 10.0  # 12x SimCLR's strongest colour jitter (0.8); a factor of 11 saturates every pixel
MAX_CROP_RATIO = 100.0  # aspect ratios of crops; LeOCLR/MoCo use 3/4..4/3
MAX_REDUCTION_FACTOR = 100.0  # ASHA uses 2-4; at 100 one trial in 100 survives each rung


class _Section(BaseModel):
    # allow_inf_nan: Python's json (so the API) reads NaN and Infinity; a run would train on them
    # until the loss is NaN, and the job row would store them as invalid JSON.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Epochs = Annotated[int, Field(gt=0, le=MAX_EPOCHS)]
Temperature = Annotated[float, Field(gt=0.0, le=MAX_TEMPERATURE)]
CpusPerWorker = Annotated[float, Field(gt=0, le=MAX_NODE_CPUS)]


def _ordered_pair(name: str, low: float, high: float, value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {list(value)}")
    return value


# Sizes of objects in a synthetic scene: at most source_size (checked below), itself at most 512.
SceneSize = Annotated[int, Field(ge=4, le=512)]
SceneSizes = Annotated[tuple[SceneSize, SceneSize], Field(description="low <= high <= source_size")]


class SyntheticSpec(_Section):
    """The built-in `synthetic-objects` scenes: a labelled shape on clutter, plus distractors."""

    source_size: Annotated[int, Field(ge=16, le=512)] = 64
    num_classes: Annotated[int, Field(ge=2, le=10)] = 10
    object_size: SceneSizes = (26, 38)
    distractors: Annotated[int, Field(ge=0, le=4)] = 0
    distractor_size: SceneSizes = (12, 20)
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


PixelMean = Annotated[float, Field(ge=0.0, le=1.0)]
PixelStd = Annotated[float, Field(gt=0.0, le=1.0)]


class DataSpec(_Section):
    source: Literal["synthetic-objects", "cifar10", "imagefolder", "parquet"] = "synthetic-objects"
    path: str | None = None  # a local path; on Ray, image folders and Parquet may be s3:// or gs:// URIs
    image_column: str = "image"  # parquet: the column of encoded image bytes
    label_column: str | None = "label"  # parquet: the label column (absent or null: unlabelled)
    num_images: Annotated[int, Field(gt=0, le=MAX_IMAGES)] | None = 5000
    num_test_images: Annotated[int, Field(ge=0, le=MAX_IMAGES)] = 1000
    image_size: Annotated[int, Field(ge=8, le=1024)] = 32
    seed: Seed = 0
    labelled: bool = True
    synthetic: SyntheticSpec = SyntheticSpec()
    # Where the JPEGs of an image folder or Parquet source are decoded: "gpu" on the training
    # device, whatever it is (nvJPEG on CUDA; loader workers or Ray Data tasks only read the
    # files), which also makes the views there; "cpu" in the loader workers or Ray Data tasks;
    # "auto" = gpu when the training device is a GPU that makes the views.
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    # ImageNet statistics are a fine default for any natural-ish image source. Both are of pixels
    # scaled to [0, 1]: their mean lies in [0, 1], their standard deviation is at most 0.5 (the
    # bound is 1 so that std 1 can mean "do not scale").
    mean: tuple[PixelMean, PixelMean, PixelMean] = (0.485, 0.456, 0.406)
    std: tuple[PixelStd, PixelStd, PixelStd] = (0.229, 0.224, 0.225)

    @model_validator(mode="after")
    def _path_when_needed(self) -> "DataSpec":
        if self.source != "synthetic-objects" and not self.path:
            raise ValueError(f"path is required for source '{self.source}'")
        if self.decode == "gpu" and self.source not in ENCODED_SOURCES:
            raise ValueError(f"decode 'gpu' is for sources of encoded images ({', '.join(ENCODED_SOURCES)}), "
                             f"not '{self.source}'")
        if self.source == "synthetic-objects" and self.num_images is None:
            raise ValueError("num_images is required for source 'synthetic-objects'")
        return self


class ModelSpec(_Section):
    backbone: Literal["tiny", "resnet18", "resnet34", "resnet50"] = "tiny"
    cifar_stem: bool = True
    width: Annotated[int, Field(ge=4, le=512)] = 32  # channels of the first stage of `tiny`
    proj_hidden_dim: Annotated[int, Field(gt=0, le=MAX_DIM)] = 512
    proj_dim: Annotated[int, Field(gt=0, le=MAX_DIM)] = 128


class LossSpec(_Section):
    temperature: Annotated[float, Field(ge=0.01, le=MAX_TEMPERATURE)] = 0.2
    queue_size: Annotated[int, Field(ge=0, le=MAX_QUEUE, description=_AT_MOST_IMAGES)] = 4096
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.99
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    # Which crop keys enter the queue after the step (the paper leaves it open; docs/method.md).
    enqueue: Literal["both", "k1"] = "both"
    # mocov2: add l(f_q(X2), f_k(X1)). leoclr: also pull f_q(crop) toward f_k(X), so the
    # query encoder sees crops too (not in the paper; a knob to measure).
    symmetric: bool = False
    # How the key encoder's batch norm is kept from leaking: shuffle across workers when
    # distributed, split into sub-batches (after a shuffle) on one worker.
    key_bn: Literal["auto", "shuffle", "split", "none"] = "auto"
    bn_splits: Annotated[int, Field(gt=0, le=MAX_BN_SPLITS,
                                    description="with key_bn split: divides optim.batch_size")] = 8


# The bounds of each end of a (low, high) pair; the validators below also check low <= high.
CropScale = Annotated[float, Field(gt=0.0, le=1.0)]
CropRatio = Annotated[float, Field(gt=0.0, le=MAX_CROP_RATIO)]
BlurSigma = Annotated[float, Field(ge=1e-3, le=100.0)]  # pixels; beyond 100 every view is one flat colour
_LOW_HIGH = "low <= high"
_AT_MOST_IMAGES = "at most data.num_images when it is set"


class AugmentSpec(_Section):
    """MoCo-v2's photometric recipe, drawn independently per view (docs/method.md)."""

    crop_scale: Annotated[tuple[CropScale, CropScale], Field(description=_LOW_HIGH)] = (0.2, 1.0)
    crop_ratio: Annotated[tuple[CropRatio, CropRatio], Field(description=_LOW_HIGH)] = (3 / 4, 4 / 3)
    brightness: Annotated[float, Field(ge=0.0, le=MAX_JITTER)] = 0.4
    contrast: Annotated[float, Field(ge=0.0, le=MAX_JITTER)] = 0.4
    saturation: Annotated[float, Field(ge=0.0, le=MAX_JITTER)] = 0.4
    hue: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    jitter_p: Probability = 0.8
    grayscale_p: Probability = 0.2
    blur_p: Probability = 0.5
    blur_sigma: Annotated[tuple[BlurSigma, BlurSigma], Field(description=_LOW_HIGH)] = (0.1, 2.0)
    flip_p: Probability = 0.5
    # Photometric augmentation (jitter, grayscale, blur) on the original X; flip is separate.
    original_photometric: bool = True
    original_flip: bool = True
    # The kind of each of the method's views (original, crop, window), replacing its own slot by slot
    # (null: leoclr [original, crop, crop], mocov2 [crop, crop]). For controls, e.g. mocov2 with
    # [original, crop]. original and window views take the original_* options.
    views: Annotated[tuple[Literal["original", "crop", "window"], ...] | None, Field(
        min_length=1, max_length=3, description="a kind (original, crop, window) per view of the method; null: "
                    "its own (leoclr original, crop, crop; mocov2 crop, crop)")] = None
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
    epochs: Epochs = 20
    batch_size: Annotated[int, Field(ge=2, le=MAX_BATCH, description=_AT_MOST_IMAGES)] = 256
    lr: Annotated[float, Field(gt=0.0, le=MAX_LR)] = 0.06
    weight_decay: Annotated[float, Field(ge=0.0, le=MAX_WEIGHT_DECAY)] = 5e-4
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: Annotated[int, Field(ge=0, le=MAX_EPOCHS, description="below optim.epochs")] = 0

    @model_validator(mode="after")
    def _warmup(self) -> "OptimSpec":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs})")
        return self


class ScalingSpec(_Section):
    num_workers: Annotated[int, Field(gt=0, le=MAX_WORKERS)] = 1
    use_gpu: bool = False
    cpus_per_worker: CpusPerWorker = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0, le=MAX_NODE_GPUS)] = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA
    compile: bool = False
    loader_workers: Annotated[int, Field(ge=0, le=64)] = 0
    # steps between reading the loss back from the device
    log_every: Annotated[int, Field(gt=0, le=MAX_STEPS)] = 10
    # Ray only: the Ray Data actor pool that decodes and augments (its size bounds the CPU it takes),
    # and how the training workers are placed (STRICT_SPREAD: one worker per node).
    data_workers: Annotated[int, Field(ge=1, le=MAX_WORKERS)] = 1
    data_cpus_per_worker: CpusPerWorker = 1.0
    # tasks: Ray's pooled worker processes (warm across epochs); actors: a map_batches actor pool,
    # which Ray Data starts afresh every epoch (a process start and a torch import each time).
    data_compute: Literal["tasks", "actors"] = "tasks"
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


def labelled_per_class(fraction: float, count: int) -> int:
    """The labelled images of a class of `count` a fine-tune takes: fraction x count rounded half up,
    at least one. The one rule, shared by the spec's check and the subset the job draws."""
    return max(1, math.floor(round(fraction * count, 9) + 0.5))


def check_label_fraction(fraction: float, smallest: int, which: str) -> None:
    """Refuse a fraction that gives the smallest class (`which`, of `smallest` images) less than one
    labelled image: taking one anyway would label more of that class than the fraction asked for."""
    if round(fraction * smallest, 9) >= 1:  # rounded: 0.0002 x 5000 is 0.9999999999999999 in floats
        return
    least = 1 / max(smallest, 1)
    unit = 10.0 ** (math.floor(math.log10(least)) - 2)
    least = math.ceil(round(least / unit, 6)) * unit  # three significant digits, rounded up
    raise ValueError(
        f"eval.finetune.label_fraction ({fraction:g}) gives {fraction * smallest:.3g} labelled images per class: "
        f"{which} has {smallest} image{'s' if smallest != 1 else ''}, so it would get less than one; "
        f"label_fraction must be at least {least:g} for this data")


class FinetuneSpec(_Section):
    """The `finetune` protocol: a copy of the backbone and a linear head trained end to end on a
    class-balanced labelled subset of the train split, top-1 (and top-5) on the test split."""

    # each class: label_fraction x its images, rounded, drawn with data.seed (which images are labelled
    # is part of the evaluation data); refused when it gives a class less than one image
    label_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    epochs: Epochs = 30
    lr: Annotated[float, Field(gt=0.0, le=MAX_LR)] = 0.05  # SGD with momentum 0.9, cosine to zero
    batch_size: Annotated[int, Field(ge=2, le=MAX_BATCH, description="capped by the labelled images")] = 256
    weight_decay: Annotated[float, Field(ge=0.0, le=MAX_WEIGHT_DECAY)] = 0.0
    crop_scale: Annotated[tuple[CropScale, CropScale], Field(
        description="low <= high; of the random resized crops (and flips) the backbone is fine-tuned on; "
                    "test images are resized whole")] = (0.2, 1.0)

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        return AugmentSpec._scale(v)


class EvalSpec(_Section):
    knn_every: Annotated[int, Field(ge=0, le=MAX_EPOCHS)] = 5  # epochs; 0 = only at the end
    # Not checked against data.num_images: the vote takes min(k, training images) neighbours, and
    # small specs (tests, the bench) keep the default k with fewer images.
    knn_k: Annotated[int, Field(gt=0, le=MAX_KNN_K)] = 200
    knn_temperature: Temperature = 0.1
    linear_probe: bool = False
    probe_epochs: Epochs = 100
    probe_lr: Annotated[float, Field(gt=0.0, le=MAX_LR)] = 0.1
    finetune: FinetuneSpec = FinetuneSpec()  # read by an evaluate job's protocol finetune only


class CheckpointSpec(_Section):
    every: Epochs = 1
    keep: Annotated[int, Field(gt=0, le=MAX_EPOCHS)] = 2  # never more than one checkpoint an epoch
    resume: bool = True  # continue from the newest checkpoint in the output folder
    # Ray only: worker failures survived by restarting from the newest checkpoint (-1: no limit).
    max_failures: Annotated[int, Field(ge=-1, le=MAX_FAILURES)] = 3
    # Ray only: where Ray Train keeps checkpoints; every node must reach it (NFS, s3://, gs://)
    # when workers span nodes. Default: <LEOCLR_DATA_DIR>/ray.
    storage_path: str | None = None
    log_to_mlflow: bool = True  # also copy each checkpoint into the MLflow run's artifacts


_REGISTRY_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
_REGISTRY_NAME_RULE = "must be 1-100 letters, digits, '_', '.', '-', starting with a letter or digit"
# Metrics a promotion can compare: ones that can be measured again on another version's encoder
# with the same evaluation data (a training loss cannot).
PROMOTION_METRICS = ("knn_top1", "linear_top1", "finetune_top1")
# The evaluate protocols that measure each of them; the first measures it alone (another version's
# value for a promotion decision).
MEASURED_BY = {"knn_top1": ("knn", "both", "transfer"), "linear_top1": ("linear", "both", "transfer"),
               "finetune_top1": ("finetune",)}


class PromoteSpec(_Section):
    """Move `alias` to a new version only when it beats the version holding it, on the same
    evaluation data, by at least `min_delta` (points of `metric`)."""

    alias: str = "champion"  # the alias that moves; not register.alias, which every new version gets
    metric: Literal["knn_top1", "linear_top1", "finetune_top1"] = "knn_top1"
    # the least improvement that moves the alias, in points of the metric; a tie never moves it
    min_delta: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    mode: Literal["max", "min"] = "max"  # max: a higher value is better

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        if not re.fullmatch(_REGISTRY_NAME, v):
            raise ValueError(_REGISTRY_NAME_RULE)
        if v == "latest" or re.fullmatch(r"v\d+", v):  # MLflow reserves these aliases
            raise ValueError(f"alias {v!r} is reserved by MLflow ('latest', 'v<number>')")
        return v


class RegisterSpec(_Section):
    model_name: str | None = None
    alias: str = "candidate"
    # after registering: move promote.alias to the new version only if it beats the holder (null: never)
    promote: PromoteSpec | None = None

    @field_validator("model_name", "alias")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(_REGISTRY_NAME, v):
            raise ValueError(_REGISTRY_NAME_RULE)
        return v

    @model_validator(mode="after")
    def _promotable(self) -> "RegisterSpec":
        if self.promote is None:
            return self
        if not self.model_name:
            raise ValueError("promote needs model_name: only a registered version can hold an alias")
        if self.promote.alias == self.alias:
            # Every new version gets `alias` unconditionally: the promotion alias must be another one.
            raise ValueError(f"promote.alias must differ from alias ({self.alias!r}), which each new version gets")
        return self


_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


class _JobSpec(_Section):
    name: str = "job"
    seed: Seed = 0
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
        views = self.augment.views
        if views is not None and len(views) != len(METHOD_VIEWS[self.method]):
            raise ValueError(
                f"augment.views has {len(views)} kind(s); method {self.method} takes "
                f"{len(METHOD_VIEWS[self.method])} views ({', '.join(METHOD_VIEWS[self.method])})"
            )
        if self.loss.key_bn == "split" and self.optim.batch_size % self.loss.bn_splits:
            raise ValueError(
                f"optim.batch_size ({self.optim.batch_size}) must be divisible by loss.bn_splits "
                f"({self.loss.bn_splits}) for key_bn 'split'"
            )
        return self

    @property
    def view_kinds(self) -> tuple[str, ...]:
        """The kind of each view the method is trained on: `augment.views`, or the method's own."""
        return tuple(self.augment.views) if self.augment.views is not None else METHOD_VIEWS[self.method]

    @model_validator(mode="after")
    def _promotion_measured(self) -> "PretrainSpec":
        p = self.register.promote
        if p is not None and p.metric == "linear_top1" and not self.eval.linear_probe:
            raise ValueError("register.promote.metric linear_top1 needs eval.linear_probe: true")
        if p is not None and p.metric == "finetune_top1":
            raise ValueError("register.promote.metric finetune_top1 is measured by an evaluate job (protocol "
                             "finetune), not by a pretrain: promote the registered version with that job's promote")
        if self.eval.finetune != FinetuneSpec():
            raise ValueError("eval.finetune is read by an evaluate job's protocol finetune, not by a pretrain")
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
    # finetune: the backbone fine-tuned end to end with a linear head on a class-balanced labelled
    # subset (eval.finetune), accuracy on the test split.
    protocol: Literal["knn", "linear", "both", "transfer", "finetune"] = "knn"
    eval: EvalSpec = EvalSpec()
    scaling: ScalingSpec = ScalingSpec()
    # decide whether the evaluated version (encoder.model_uri models:/...) takes promote.alias
    promote: PromoteSpec | None = None

    @model_validator(mode="after")
    def _promotable(self) -> "EvaluateSpec":
        p = self.promote
        if p is None:
            return self
        if not (self.encoder.model_uri or "").startswith("models:/"):
            raise ValueError("promote needs encoder.model_uri of a registered version (models:/name/version "
                             "or models:/name@alias)")
        if self.protocol not in MEASURED_BY[p.metric]:
            raise ValueError(f"promote.metric {p.metric} is not measured by protocol {self.protocol!r}")
        return self

    @model_validator(mode="after")
    def _finetune(self) -> "EvaluateSpec":
        f, d = self.eval.finetune, self.data
        if self.protocol != "finetune":
            if f != FinetuneSpec():
                raise ValueError(f"eval.finetune is read by protocol finetune only, not {self.protocol!r}")
            return self
        if d.source == "synthetic-objects" and d.num_images is not None:
            # Synthetic labels go round the classes, so the smallest class is known here; a file
            # source's classes are counted when the job reads its labels.
            k = d.synthetic.num_classes
            check_label_fraction(f.label_fraction, max(1, d.num_images // k),
                                 f"the smallest class (data.num_images {d.num_images} over {k} classes)")
        return self


# Fields of `scaling` an embed job does not read (its model replicas are `replicas`): they must keep
# their defaults, so that a value there is an error rather than a knob that does nothing.
_EMBED_UNREAD_SCALING = ("num_workers", "loader_workers", "log_every", "data_compute", "placement_strategy")


class EmbedSpec(_JobSpec):
    """Embed a collection with an encoder: Ray Data batch inference into a Parquet dataset (one row
    per image: its id, its label when known, its embedding). `scaling` gives each model replica's
    CPUs/GPUs (`cpus_per_worker`, `gpus_per_worker`, `use_gpu`, `precision`) and the decode tasks
    (`data_workers` x `data_cpus_per_worker`); `output_dir` is where the dataset is written (a
    folder or an s3:// / gs:// URI every node reaches; default <storage path>/embeddings/<name>),
    replaced as a whole by a re-run of the same job. Images are square-resized to `data.image_size`;
    `data.mean` / `data.std` normalise a checkpoint's backbone (a registry encoder carries its own).
    Image folders: every image under `data.path` (the first `data.num_images` by path when set)."""

    kind: Literal["embed"] = "embed"
    encoder: EncoderRef
    data: DataSpec = DataSpec()
    batch_size: Annotated[int, Field(gt=0, le=MAX_BATCH)] = 256  # images per model call of a replica
    replicas: Annotated[int, Field(gt=0, le=MAX_WORKERS)] = 1  # model replicas (the actor pool's size)
    scaling: ScalingSpec = ScalingSpec()
    output_dir: Annotated[str | None, Field(
        description="the embeddings dataset (folder or s3:// / gs:// URI); default <storage path>/embeddings/<name>",
    )] = None

    @model_validator(mode="after")
    def _consistent(self) -> "EmbedSpec":
        default = ScalingSpec()
        for name in _EMBED_UNREAD_SCALING:
            if getattr(self.scaling, name) != getattr(default, name):
                hint = "; the number of model replicas is `replicas`" if name == "num_workers" else ""
                raise ValueError(f"scaling.{name} is not read by an embed job{hint}")
        if self.data.decode == "gpu":
            raise ValueError("data.decode 'gpu' is not used by an embed job: its decode tasks decode on the CPU")
        return self

    def output(self, storage_root: str) -> str:
        """Where the dataset goes: `output_dir`, or <storage_root>/embeddings/<name>."""
        return self.output_dir or f"{storage_root.rstrip('/')}/embeddings/{self.name}"


_SEARCHED = "both ends are validated as values of the field searched"


class SearchDim(_Section):
    """One dimension of a search space: `choice`/`grid` over `values`, `uniform`/`loguniform` in [low, high]."""

    type: Literal["choice", "grid", "uniform", "loguniform"]
    values: Annotated[list[Any], Field(max_length=MAX_CHOICES)] | None = None
    # No bound of their own: both ends are validated as values of the field searched.
    low: Annotated[float | None, Field(description=_SEARCHED)] = None
    high: Annotated[float | None, Field(description=_SEARCHED)] = None

    @field_validator("values")
    @classmethod
    def _finite(cls, v: list[Any] | None) -> list[Any] | None:
        # `Any` skips the section's allow_inf_nan: look into the values (and lists of them) here.
        def bad(x: Any) -> bool:
            if isinstance(x, float):
                return not math.isfinite(x)
            if isinstance(x, (list, tuple)):
                return any(bad(y) for y in x)
            if isinstance(x, dict):
                return any(bad(y) for y in x.values())
            return False

        for i, x in enumerate(v or ()):
            if bad(x):
                raise ValueError(f"values[{i}] ({x}) is not a finite number")
        return v

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
    # epochs every trial runs before it can be stopped
    grace_period: Annotated[int, Field(gt=0, le=MAX_EPOCHS,
                                       description="with asha: at most base.optim.epochs")] = 1
    reduction_factor: Annotated[float, Field(gt=1.0, le=MAX_REDUCTION_FACTOR)] = 2.0


# Spec fields a search may not vary: they name the job or where it lives, not how it trains.
UNTUNABLE = ("kind", "name", "output_dir", "register", "checkpoint.storage_path", "checkpoint.resume")


class TuneSpec(_JobSpec):
    """A search: trials of a base pretrain spec with fields drawn from `space` (spec path -> dimension).
    Each trial is a Ray Train run with the base spec's `scaling`; the best trial's encoder is
    registered under `register`."""

    kind: Literal["tune"] = "tune"
    base: PretrainSpec
    space: dict[str, SearchDim]
    # with grid dimensions: repeats of the whole grid
    num_samples: Annotated[int, Field(gt=0, le=MAX_TRIALS,
                                      description=f"times the grid's points at most {MAX_TRIALS} trials")] = 4
    metric: Literal["knn_top1", "loss"] = "knn_top1"
    mode: Literal["max", "min"] | None = None  # default: max for knn_top1, min for loss
    scheduler: SchedulerSpec = SchedulerSpec()
    search: Literal["random", "optuna"] = "random"
    max_concurrent_trials: Annotated[int, Field(gt=0, le=MAX_WORKERS)] = 2
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
        points = math.prod(len(d.values or ()) for d in self.space.values() if d.type == "grid")
        if self.num_samples * points > MAX_TRIALS:
            raise ValueError(f"num_samples ({self.num_samples}) x {points} grid points is "
                             f"{self.num_samples * points} trials, above the limit of {MAX_TRIALS}")
        if self.scheduler.type == "asha" and self.scheduler.grace_period > self.base.optim.epochs:
            raise ValueError(f"scheduler.grace_period ({self.scheduler.grace_period}) exceeds base.optim.epochs "
                             f"({self.base.optim.epochs}): ASHA could never stop a trial")
        if self.metric == "loss" and self.mode == "max":
            raise ValueError("metric 'loss' with mode 'max' would pick the worst trial")
        if self.register.promote is not None or self.base.register.promote is not None:
            raise ValueError("register.promote is not run by a search: promote its registered version with an "
                             "evaluate job's promote")
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


JobSpec = Annotated[Union[PretrainSpec, EvaluateSpec, TuneSpec, EmbedSpec], Field(discriminator="kind")]
_JOB_ADAPTER: TypeAdapter[PretrainSpec | EvaluateSpec | TuneSpec | EmbedSpec] = TypeAdapter(JobSpec)
KINDS = ("pretrain", "evaluate", "tune", "embed")


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in KINDS)
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


def parse_spec(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> PretrainSpec | EvaluateSpec | TuneSpec | EmbedSpec:
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


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PretrainSpec | EvaluateSpec | TuneSpec | EmbedSpec:
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
