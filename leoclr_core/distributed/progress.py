"""A pretrain job's progress, from rank 0 to the driver: rank 0 pushes its records to a small actor
(`ProgressLog`, fire and forget); the driver's `Follower` reads them, writes them to the run folder's
`metrics.jsonl` as they come, and replays them into the caller's callbacks (the CLI's display).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import ray

from leoclr_core.training.callbacks import Callbacks, RunState
from leoclr_core.training.run_folder import RunFolder

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class ProgressLog:
    """Records pushed by rank 0 (fire and forget), read by the driver's display thread."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def push(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def since(self, index: int) -> list[dict[str, Any]]:
        return self.records[index:]


class PushProgress(Callbacks):
    def __init__(self, actor: Any):
        self.actor = actor

    def on_start(self, state: RunState) -> None:
        self.actor.push.remote({"type": "start", "epochs": state.epochs, "steps_per_epoch": state.steps_per_epoch,
                                "start_epoch": state.start_epoch})

    def on_log(self, record: dict[str, Any]) -> None:
        self.actor.push.remote(record)

    def on_epoch(self, record: dict[str, Any], state: RunState) -> None:
        self.actor.push.remote(record)


class Follower:
    """Reads rank 0's records off the ProgressLog actor and replays them into the caller's callbacks.
    A worker-group restart shows up as a second "start": counted, and its repeated epochs noted."""

    def __init__(self, actor: Any, callbacks: Callbacks, out: Path):
        self.actor, self.cb, self.out = actor, callbacks, out
        self.folder = RunFolder(out)
        self.index, self.records, self.restarts, self.redone = 0, [], 0, 0
        self.state: RunState | None = None
        self.nodes: list[str] = []  # node id of each worker, by rank
        self.resumed_from: list[int] = []  # the epoch each worker-group restart resumed at
        self.last_epoch = 0
        self.diverged: str | None = None  # the error of a run whose loss stopped being finite
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="leoclr-progress", daemon=True)

    def _handle(self, r: dict[str, Any]) -> None:
        if r["type"] == "placement":
            self.nodes = r["nodes"]
            return
        if r["type"] == "diverged":
            self.diverged = r["error"]
            return
        if r["type"] == "start":
            if self.state is None:
                self.state = RunState(out_dir=self.out, epochs=r["epochs"], steps_per_epoch=r["steps_per_epoch"],
                                      start_epoch=r["start_epoch"])
                self.last_epoch = r["start_epoch"]
                if r["start_epoch"] > 0:  # a resumed job: the records its earlier driver wrote still count
                    self.records = self.folder.records()
                self.cb.on_start(self.state)
            else:
                self.restarts += 1
                self.resumed_from.append(r["start_epoch"])
                self.redone += max(0, self.last_epoch - r["start_epoch"])
                log.warning("worker group restarted from epoch %d (last finished epoch %d)",
                            r["start_epoch"], self.last_epoch)
            # Records of epochs the restart will run again are dropped.
            self.records = [x for x in self.records if x.get("epoch", 0) <= r["start_epoch"]]
            if self.state is not None:
                self.state.history = [x for x in self.records if x["type"] == "epoch"]
            self.folder.write_records(self.records)
            return
        self.records.append(r)
        self.folder.append(r)
        if r["type"] == "step":
            self.cb.on_log(r)
        elif r["type"] == "epoch" and self.state is not None:
            self.last_epoch = r["epoch"]
            self.state.history.append(r)
            self.cb.on_epoch(r, self.state)

    def poll(self) -> None:
        new = ray.get(self.actor.since.remote(self.index))
        self.index += len(new)
        for r in new:
            self._handle(r)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - a display problem must not stop the run
                log.debug("progress poll failed: %s", exc)
            self.stop.wait(0.5)

    def __enter__(self) -> "Follower":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()
