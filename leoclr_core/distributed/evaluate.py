"""An evaluate job on Ray: one task with the spec's resources loads the encoder (registry URI,
run URI or checkpoint path), runs k-NN / linear probe / transfer, and the driver records the
results in MLflow and on the evaluated model version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
import torch

from leoclr_core import tracking
from leoclr_core.evaluation.job import evaluate_job
from leoclr_core.settings import CoreSettings, core_settings
from leoclr_core.spec.models import EvaluateSpec


def _evaluate_task(spec_json: dict[str, Any], tracking_uri: str, data_dir: str) -> dict[str, Any]:
    spec = EvaluateSpec.model_validate(spec_json)
    settings = CoreSettings(data_dir=data_dir, mlflow_tracking_uri=tracking_uri)
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    encoder = tracking.load_encoder(spec.encoder.model_uri, settings) if spec.encoder.model_uri else None
    device = "cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else None
    return evaluate_job(spec, device=device, encoder=encoder, write_outputs=False)


def run_evaluate(spec: EvaluateSpec, settings: CoreSettings | None = None,
                 out_dir: Path | None = None) -> dict[str, Any]:
    """Run on the connected Ray cluster; returns the results with the MLflow run id added."""
    s = settings or core_settings()
    sc = spec.scaling
    task = ray.remote(_evaluate_task).options(
        num_cpus=sc.cpus_per_worker, num_gpus=sc.gpus_per_worker if sc.use_gpu else 0, max_retries=0,
    )
    result = ray.get(task.remote(spec.model_dump(mode="json"), s.tracking_uri, str(s.home)))
    uri = spec.encoder.model_uri or str(Path(spec.encoder.checkpoint).resolve())  # type: ignore[arg-type]
    metrics = {k: v for k, v in result.items() if k.endswith("_top1")}
    result["mlflow_run_id"] = tracking.log_evaluation(spec.name, spec, metrics, uri, settings=s)
    out = Path(out_dir) if out_dir else spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result
