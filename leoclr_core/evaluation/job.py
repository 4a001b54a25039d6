"""An evaluate job in one process: a frozen encoder, k-NN and/or a linear probe, results written."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from leoclr_core.training.engine import resolve_runtime
from leoclr_core.evaluation.probes import evaluate_backbone
from leoclr_core.spec.models import EvaluateSpec
from leoclr_core.training.checkpoint import load_backbone
from leoclr_core.training.feed import job_source

# An encoder from the registry normalises its own input: it is fed [0, 1] images as they are.
IDENTITY_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def evaluate_job(
    spec: EvaluateSpec,
    device: torch.device | str | None = None,
    encoder: nn.Module | None = None,
    write_outputs: bool = True,
) -> dict[str, Any]:
    """Returns {"knn_top1": .., "linear_top1": .., ...} and writes it to <output>/results.json.

    `encoder`: an already loaded `ImageEncoder` (the tracking layer resolves `encoder.model_uri`
    to one); otherwise `encoder.checkpoint` is read from disk.
    """
    if encoder is None and spec.encoder.model_uri is not None:
        raise ValueError(
            f"encoder.model_uri {spec.encoder.model_uri!r} must be resolved by the tracking layer "
            "(leoclr evaluate does it); in-process, point encoder.checkpoint at a run folder, "
            "a checkpoint file or an encoder.pt"
        )
    runtime = resolve_runtime(spec.scaling, device)
    d = spec.data
    if encoder is not None:
        backbone, (mean, std) = encoder.eval(), IDENTITY_NORM
        backbone_name = type(getattr(encoder, "backbone", encoder)).__name__
        source = spec.encoder.model_uri
    else:
        backbone, model = load_backbone(spec.encoder.checkpoint)  # type: ignore[arg-type]
        mean, std, backbone_name, source = d.mean, d.std, model.backbone, spec.encoder.checkpoint
    backbone.to(runtime.device)
    train, test = job_source(d, "train"), job_source(d, "test")
    if not train.labelled or not train.num_classes:
        raise ValueError(f"data source {d.source!r} at {d.path!r} is unlabelled: evaluation needs labels")
    e = spec.eval
    both = spec.protocol in ("both", "transfer")
    result = evaluate_backbone(
        backbone, train, test, runtime, num_classes=train.num_classes, size=d.image_size, mean=mean,
        std=std, knn=spec.protocol == "knn" or both, linear=spec.protocol == "linear" or both,
        k=e.knn_k, knn_temperature=e.knn_temperature, probe_epochs=e.probe_epochs, probe_lr=e.probe_lr,
    )
    out = {
        **result.as_metrics(),
        "encoder": str(source),
        "backbone": backbone_name,
        "protocol": spec.protocol,
        "features": "offline, frozen backbone features, whole image",
        "data": d.source,
        "train_images": len(train),
        "test_images": len(test),
    }
    if write_outputs:
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        (spec.out_dir / "results.json").write_text(json.dumps(out, indent=2))
    return out
