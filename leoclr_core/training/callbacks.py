"""What a pretrain run tells its watchers (progress displays, trackers), in process or on Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunState:
    """What the caller of `pretrain` sees during and after the run."""

    out_dir: Path
    epochs: int
    steps_per_epoch: int
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


class Callbacks:
    """Hooks for progress displays and trackers; every method is optional. `on_checkpoint` sees
    each checkpoint file rank 0 writes, while it exists (on Ray, before it is reported); `on_end`
    comes once the last epoch is done (not when training raised)."""

    def on_start(self, state: RunState) -> None: ...
    def on_log(self, record: dict[str, Any]) -> None: ...
    def on_epoch(self, record: dict[str, Any], state: RunState) -> None: ...
    def on_checkpoint(self, path: Path, epoch: int) -> None: ...
    def on_end(self, state: RunState) -> None: ...


class AllCallbacks(Callbacks):
    def __init__(self, *callbacks: Callbacks):
        self.callbacks = callbacks

    def on_start(self, state: RunState) -> None:
        for c in self.callbacks:
            c.on_start(state)

    def on_log(self, record: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_log(record)

    def on_epoch(self, record: dict[str, Any], state: RunState) -> None:
        for c in self.callbacks:
            c.on_epoch(record, state)

    def on_checkpoint(self, path: Path, epoch: int) -> None:
        for c in self.callbacks:
            c.on_checkpoint(path, epoch)

    def on_end(self, state: RunState) -> None:
        for c in self.callbacks:
            c.on_end(state)
