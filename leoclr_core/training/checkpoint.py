"""Checkpoints that let a run continue, not restart.

A checkpoint holds the query and key encoders, the queue and its pointer, the optimiser, the lr
scheduler, the epoch, global step and position in the data, and every RNG state. Files are
written to a temporary name and renamed, so a crash never leaves a half-written checkpoint
where a resume would find it. A run's checkpoints live in a `CheckpointStore` (a folder here, Ray
Train's storage on Ray); its exported encoder (`encoder.pt`) is read back by `load_backbone`.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from leoclr_core.nn.methods import MomentumMethod
from leoclr_core.nn.model import build_backbone
from leoclr_core.spec.models import ModelSpec

log = logging.getLogger(__name__)

CKPT_PATTERN = re.compile(r"^epoch-(\d{4,})\.pt$")
FORMAT_VERSION = 1


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(
    method: MomentumMethod,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    epoch: int,
    global_step: int,
    spec: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a resume needs. `epoch` is the number of completed epochs (the data position:
    the next epoch to run; views of an epoch are seeded by (seed, epoch), so it replays exactly)."""
    return {
        "format_version": FORMAT_VERSION,
        "query": method.query_encoder.state_dict(),
        "key": method.key.state_dict(),
        "queue": method.queue.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "global_step": global_step,
        "rng": capture_rng(),
        "spec": spec,
        "metrics": metrics or {},
    }


def restore_training_state(
    state: dict[str, Any],
    method: MomentumMethod,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[int, int]:
    """Load `state` into the given objects; returns (completed epochs, global step)."""
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"checkpoint format {version!r} is not the supported format {FORMAT_VERSION}")
    method.query_encoder.load_state_dict(state["query"])
    method.key.load_state_dict(state["key"])
    method.queue.load_state_dict(state["queue"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return int(state["epoch"]), int(state["global_step"])


def atomic_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def checkpoint_path(directory: str | Path, epoch: int) -> Path:
    return Path(directory) / f"epoch-{epoch:04d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if CKPT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CKPT_PATTERN.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(state: dict[str, Any], directory: str | Path, keep: int) -> Path:
    """Write the checkpoint of `state["epoch"]` and delete all but the newest `keep`."""
    path = atomic_save(state, checkpoint_path(directory, state["epoch"]))
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise FileNotFoundError(f"no checkpoint (epoch-NNNN.pt) in {p}")
        p = found
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    # weights_only=False: the state holds RNG states (numpy tuples) as well as tensors; only load
    # checkpoints you wrote yourself.
    return torch.load(p, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------- where a run's checkpoints live
OnSaved = Callable[[Path, int], None]


class CheckpointStore:
    """Where a run's checkpoints live: the newest one to resume from, and where each epoch ends.

    `end_epoch` is called on every rank after every epoch (a Ray Train store reports there, which
    every worker must do); `state` builds the checkpoint when one is due, on rank 0 only, and
    `on_saved(path, epoch)` sees the written file while it exists (a store may upload and delete it).
    """

    def latest(self) -> dict[str, Any] | None:
        return None

    def end_epoch(self, record: dict[str, Any], state: Callable[[], dict[str, Any]] | None,
                  on_saved: OnSaved) -> None:
        return None


class FolderStore(CheckpointStore):
    """`epoch-NNNN.pt` files in one folder, the newest `keep` kept (the in-process runner's store)."""

    def __init__(self, directory: Path, keep: int, resume: bool = True):
        self.directory, self.keep, self.resume = Path(directory), keep, resume

    def latest(self) -> dict[str, Any] | None:
        found = latest_checkpoint(self.directory) if self.resume else None
        if found is None:
            return None
        log.info("resuming from %s", found)
        return load_checkpoint(found)

    def end_epoch(self, record: dict[str, Any], state: Callable[[], dict[str, Any]] | None,
                  on_saved: OnSaved) -> None:
        if state is not None:
            on_saved(save_checkpoint(state(), self.directory, self.keep), record["epoch"])


# ---------------------------------------------------------------- the exported encoder
def save_encoder(path: Path, backbone: nn.Module, model: ModelSpec, extra: dict[str, Any] | None = None) -> Path:
    """The exported encoder: backbone weights plus the model section needed to rebuild it."""
    return atomic_save(
        {"model": model.model_dump(mode="json"), "backbone": backbone.state_dict(), **(extra or {})}, path
    )


def load_backbone(path: str | Path) -> tuple[nn.Module, ModelSpec]:
    """A backbone from `encoder.pt`, a checkpoint file, or a run folder (its newest checkpoint)."""
    p = Path(path)
    if p.is_dir() and (p / "encoder.pt").is_file():
        p = p / "encoder.pt"
    elif p.is_dir() and (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name == "encoder.pt" and p.is_file():
        state = torch.load(p, map_location="cpu", weights_only=False)
    else:
        state = load_checkpoint(p)
    return backbone_from_state(state, str(path))


def backbone_from_state(state: dict[str, Any], where: str = "the state") -> tuple[nn.Module, ModelSpec]:
    """The query backbone of an exported encoder or of a training checkpoint's state."""
    if "backbone" in state:
        model, weights = ModelSpec(**state["model"]), state["backbone"]
    elif "query" in state:
        model = ModelSpec(**state["spec"]["model"])
        weights = {k.removeprefix("backbone."): v for k, v in state["query"].items() if k.startswith("backbone.")}
    else:
        raise ValueError(f"{where} holds neither an exported encoder nor a training checkpoint")
    backbone, _ = build_backbone(model)
    backbone.load_state_dict(weights)
    return backbone.eval(), model
