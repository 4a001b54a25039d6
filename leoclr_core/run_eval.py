"""An evaluate job in one process: load a frozen encoder, run k-NN and/or a linear probe, write results."""

from __future__ import annotations

import json
from typing import Any

import torch

from .engine import resolve_runtime
from .evaluate import evaluate_backbone
from .spec import EvaluateSpec
from .train import job_source, load_backbone


def evaluate_job(spec: EvaluateSpec, device: torch.device | str | None = None) -> dict[str, Any]:
    """Returns {"knn_top1": .., "linear_top1": .., ...} and writes it to <output>/results.json."""
    if spec.encoder.model_uri is not None:
        raise ValueError(
            "encoder.model_uri needs the MLflow tracking layer; locally, point encoder.checkpoint at "
            "a run folder, a checkpoint file or an encoder.pt"
        )
    runtime = resolve_runtime(spec.scaling, device)
    backbone, model = load_backbone(spec.encoder.checkpoint)  # type: ignore[arg-type]
    backbone.to(runtime.device)
    d = spec.data
    train, test = job_source(d, "train"), job_source(d, "test")
    if not train.labelled or not train.num_classes:
        raise ValueError(f"data source {d.source!r} at {d.path!r} is unlabelled: evaluation needs labels")
    e = spec.eval
    result = evaluate_backbone(
        backbone, train, test, runtime, num_classes=train.num_classes, size=d.image_size, mean=d.mean,
        std=d.std, knn=spec.protocol in ("knn", "both"), linear=spec.protocol in ("linear", "both"),
        k=e.knn_k, knn_temperature=e.knn_temperature, probe_epochs=e.probe_epochs, probe_lr=e.probe_lr,
    )
    out = {
        **result.as_metrics(),
        "encoder": str(spec.encoder.checkpoint),
        "backbone": model.backbone,
        "protocol": "offline, frozen backbone features, whole image",
        "train_images": len(train),
        "test_images": len(test),
    }
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    (spec.out_dir / "results.json").write_text(json.dumps(out, indent=2))
    return out
