"""An evaluate job in one process: k-NN and/or a linear probe of a frozen encoder, or a fine-tune of
a copy of it; results written."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from leoclr_core.data import ImageSource
from leoclr_core.evaluation import neighbours
from leoclr_core.evaluation.finetune import finetune
from leoclr_core.evaluation.probes import evaluate_backbone, extract_features
from leoclr_core.spec.models import DataSpec, EvaluateSpec
from leoclr_core.training.checkpoint import load_backbone
from leoclr_core.training.engine import Runtime, resolve_runtime
from leoclr_core.training.feed import job_source

log = logging.getLogger(__name__)

# An encoder from the registry normalises its own input: it is fed [0, 1] images as they are.
IDENTITY_NORM = neighbours.IDENTITY_NORM
# The job's neighbour sheet: 4 fixed test images, 8 neighbours each.
SHEET_NAME, SHEET_QUERIES, SHEET_K = "neighbours.png", 4, 8


def evaluate_job(
    spec: EvaluateSpec,
    device: torch.device | str | None = None,
    encoder: nn.Module | None = None,
    write_outputs: bool = True,
    sheet_dir: Path | None = None,
) -> dict[str, Any]:
    """Returns {"knn_top1": .., "linear_top1": .., ...} (protocol finetune: {"finetune_top1": ..,
    "finetune_top5": .., "finetune": {"label_fraction": .., "labelled_images": ..}, ...}) and writes it
    to <output>/results.json.

    `encoder`: an already loaded `ImageEncoder` (the tracking layer resolves `encoder.model_uri`
    to one); otherwise `encoder.checkpoint` is read from disk. A neighbour sheet of fixed test
    images (`neighbours.png`) goes to `sheet_dir`, or to <output> with the results; its path is
    the result's `neighbours_sheet` (the caller uploads it to the job's run).
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
    if spec.protocol == "finetune":
        tuned = finetune(backbone, train, test, runtime, e.finetune, num_classes=train.num_classes,
                         size=d.image_size, mean=mean, std=std, subset_seed=d.seed, seed=spec.seed,
                         num_workers=spec.scaling.loader_workers)
        measured = {**tuned.as_metrics(), "finetune": {"label_fraction": tuned.label_fraction,
                                                       "labelled_images": tuned.labelled_images}}
        features = "backbone fine-tuned end to end with a linear head; test images resized whole"
    else:
        both = spec.protocol in ("both", "transfer")
        measured = evaluate_backbone(
            backbone, train, test, runtime, num_classes=train.num_classes, size=d.image_size, mean=mean,
            std=std, knn=spec.protocol == "knn" or both, linear=spec.protocol == "linear" or both,
            k=e.knn_k, knn_temperature=e.knn_temperature, probe_epochs=e.probe_epochs, probe_lr=e.probe_lr,
        ).as_metrics()
        features = "offline, frozen backbone features, whole image"
    out = {
        **measured,
        "encoder": str(source),
        "backbone": backbone_name,
        "protocol": spec.protocol,
        "features": features,
        "data": d.source,
        "train_images": len(train),
        "test_images": len(test),
    }
    folder = sheet_dir or (spec.out_dir if write_outputs else None)
    if folder is not None:
        sheet = neighbour_sheet(backbone, test, runtime, d, mean, std, str(source), Path(folder) / SHEET_NAME)
        if sheet is not None:
            out["neighbours_sheet"] = str(sheet)
    if write_outputs:
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        (spec.out_dir / "results.json").write_text(json.dumps(out, indent=2))
    return out


def neighbour_sheet(backbone: nn.Module, test: ImageSource, runtime: Runtime, data: DataSpec,
                    mean: tuple[float, ...], std: tuple[float, ...], encoder: str, out: Path) -> Path | None:
    """The sheet of SHEET_QUERIES fixed test images and their SHEET_K nearest other test images,
    from the backbone's features of the test split. A preview: when it cannot be drawn the
    evaluation still stands (None, and a warning)."""
    try:
        feats, labels = extract_features(backbone, test, runtime, size=data.image_size, mean=mean, std=std)
        emb = neighbours.Embeddings(
            ids=[f"row-{i}" for i in range(len(test))], labels=[int(y) for y in labels.tolist()],
            vectors=feats.cpu().numpy(), encoder=encoder,
            data={**data.model_dump(mode="json"), "split": "test"})
        picks = neighbours.fixed_queries(len(emb.ids), SHEET_QUERIES)
        return neighbours.sheet_for_queries(emb, [emb.ids[i] for i in picks], SHEET_K, out,
                                            lookup=neighbours.SourceLookup(test))
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("no neighbour sheet for %s: %s", encoder, exc)
        return None
