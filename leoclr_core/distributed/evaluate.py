"""An evaluate job on Ray: one task with the spec's resources loads the encoder (registry URI,
run URI or checkpoint path), runs k-NN / linear probe / transfer / fine-tune, and the driver records
the results in MLflow and on the evaluated model version.

With `promote`, the driver then decides whether the version takes the promotion alias
(`tracking.promote`), measuring the version that holds it with the same task on the same data
unless that version already carries the value for this data. A pretrain's driver makes the same
decision after it registers its encoder (`decide_promotion`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch

from leoclr_core import tracking
from leoclr_core.evaluation.job import SHEET_NAME, evaluate_job
from leoclr_core.settings import CoreSettings, core_settings
from leoclr_core.spec.models import (
    MEASURED_BY,
    DataSpec,
    EncoderRef,
    EvalSpec,
    EvaluateSpec,
    PromoteSpec,
    ScalingSpec,
)


def _evaluate_task(spec_json: dict[str, Any], tracking_uri: str, data_dir: str,
                   sheet: bool = False) -> dict[str, Any]:
    spec = EvaluateSpec.model_validate(spec_json)
    settings = CoreSettings(data_dir=data_dir, mlflow_tracking_uri=tracking_uri)
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    encoder = tracking.load_encoder(spec.encoder.model_uri, settings) if spec.encoder.model_uri else None
    device = "cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else None
    with tempfile.TemporaryDirectory() as tmp:
        result = evaluate_job(spec, device=device, encoder=encoder, write_outputs=False,
                              sheet_dir=Path(tmp) if sheet else None)
        if "neighbours_sheet" in result:  # the PNG's bytes go back: this task may run on another node
            result["neighbours_sheet"] = Path(result["neighbours_sheet"]).read_bytes()
    return result


def _run_task(spec: EvaluateSpec, s: CoreSettings, sheet: bool = False) -> dict[str, Any]:
    sc = spec.scaling
    task = ray.remote(_evaluate_task).options(
        num_cpus=sc.cpus_per_worker, num_gpus=sc.gpus_per_worker if sc.use_gpu else 0, max_retries=0,
    )
    return ray.get(task.remote(spec.model_dump(mode="json"), s.tracking_uri, str(s.home), sheet))


def measure_version(name: str, version: str, metric: str, data: DataSpec, evaluation: EvalSpec,
                    scaling: ScalingSpec, settings: CoreSettings | None = None, seed: int = 0) -> float:
    """`metric` of a registered version's encoder on `data`, by the protocol of `evaluation`: the
    evaluate job's task, with `scaling`'s resources (`seed`: the fine-tune's, for finetune_top1)."""
    spec = EvaluateSpec(name=f"{name}-v{version}-promotion"[:64], seed=seed,
                        encoder=EncoderRef(model_uri=f"models:/{name}/{version}"), data=data, eval=evaluation,
                        scaling=scaling, protocol=MEASURED_BY[metric][0])
    result = _run_task(spec, settings or core_settings())
    if result.get(metric) is None:
        raise ValueError(f"evaluating version {version} of {name} gave no {metric} on {data.source} data")
    return float(result[metric])


def decide_promotion(name: str, version: str, promote: PromoteSpec, candidate: float | None, data: DataSpec,
                     evaluation: EvalSpec, scaling: ScalingSpec,
                     settings: CoreSettings | None = None, seed: int = 0) -> tracking.PromotionDecision:
    """The promotion decision for `version`, compared with the alias's holder on `data`; `candidate`:
    its value measured already (a pretrain's final evaluation), None to measure it here."""
    s = settings or core_settings()

    def measure(v: str) -> float:
        return measure_version(name, v, promote.metric, data, evaluation, scaling, s, seed)

    value = measure(version) if candidate is None else float(candidate)
    fingerprint = tracking.eval_fingerprint(data, evaluation, promote.metric)
    return tracking.promote(name, version, promote, value, measure, data_fingerprint=fingerprint, settings=s)


def run_evaluate(spec: EvaluateSpec, settings: CoreSettings | None = None,
                 out_dir: Path | None = None) -> dict[str, Any]:
    """Run on the connected Ray cluster; returns the results with the MLflow run id added (and the
    promotion decision, with `promote`)."""
    s = settings or core_settings()
    pinned = None
    if spec.promote is not None:
        # The version evaluated is the version decided on, even if the alias named moves meanwhile.
        pinned = tracking.resolve_version(spec.encoder.model_uri, s)  # type: ignore[arg-type]
        if pinned is None:
            raise ValueError(f"promote: encoder.model_uri {spec.encoder.model_uri!r} is not a registered version")
        spec = spec.model_copy(update={"encoder": EncoderRef(model_uri=f"models:/{pinned[0]}/{pinned[1]}")})
    result = _run_task(spec, s, sheet=True)
    png = result.pop("neighbours_sheet", None)
    uri = spec.encoder.model_uri or str(Path(spec.encoder.checkpoint).resolve())  # type: ignore[arg-type]
    metrics = {k: v for k, v in result.items() if k.endswith(("_top1", "_top5"))}
    result["mlflow_run_id"] = tracking.log_evaluation(spec.name, spec, metrics, uri, settings=s)
    if spec.promote is not None and pinned is not None:
        result["promotion"] = decide_promotion(*pinned, spec.promote, result.get(spec.promote.metric), spec.data,
                                               spec.eval, spec.scaling, s, spec.seed).as_dict()
    out = Path(out_dir) if out_dir else spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if png is not None:
        (out / SHEET_NAME).write_bytes(png)
        tracking.log_artifact_file(result["mlflow_run_id"], out / SHEET_NAME, "neighbours", settings=s)
        result["neighbours_sheet"] = str(out / SHEET_NAME)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result
