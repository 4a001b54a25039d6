"""A pretrain run's folder, written by the one process that owns it (the in-process runner, or the
Ray driver after `fit`): `spec.json`, `metrics.jsonl` (one JSON record per log window, type
"step", and per epoch, type "epoch"), `encoder.pt` and `summary.json`. (The in-process runner's
checkpoints go to its `checkpoints/` subfolder through a `FolderStore`.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch.nn as nn

from leoclr_core.spec.models import PretrainSpec
from leoclr_core.training.checkpoint import save_encoder

Record = dict[str, Any]


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"

    def create(self, spec: PretrainSpec) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "spec.json").write_text(spec.model_dump_json(indent=2))

    # metrics.jsonl
    def records(self) -> list[Record]:
        """Every record, or none when the file is missing or unreadable."""
        try:
            return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            return []

    def epoch_records(self) -> list[Record]:
        return [r for r in self.records() if r.get("type") == "epoch"]

    def append(self, record: Record) -> None:
        """As records come, so a process that dies leaves the ones so far behind."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.metrics.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def write_records(self, records: list[Record]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.metrics.with_name(self.metrics.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.metrics)

    def keep_until(self, completed_epochs: int) -> list[Record]:
        """On resume, drop the records of epochs after the checkpoint (they will be run again);
        returns the epoch records kept."""
        if self.metrics.exists():
            self.write_records([r for r in self.records() if r.get("epoch", 0) <= completed_epochs])
        return self.epoch_records()

    def clear_records(self) -> None:
        self.metrics.unlink(missing_ok=True)

    # encoder.pt, summary.json
    def write_encoder(self, backbone: nn.Module, spec: PretrainSpec, final: Record) -> Path:
        return save_encoder(self.path / "encoder.pt", backbone, spec.model,
                            {"method": spec.method, "metrics": final, "data": spec.data.model_dump(mode="json")})

    def write_summary(self, spec: PretrainSpec, final: Record, **extra: Any) -> Path:
        summary = {"name": spec.name, "method": spec.method, "epochs": spec.optim.epochs,
                   "final": final, "finished_at": time.time(), **extra}
        self.summary.write_text(json.dumps(summary, indent=2))
        return self.summary

    def summary_run_id(self) -> str | None:
        """The MLflow run whose result the summary holds (None: no readable summary, or none)."""
        try:
            return json.loads(self.summary.read_text()).get("mlflow_run_id")
        except (OSError, ValueError):
            return None
