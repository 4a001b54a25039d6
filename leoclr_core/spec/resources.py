"""What a job asks of a Ray cluster, from its spec alone (no torch, no Ray), so that the API can
refuse a job that can never be placed and hold one back until the cluster has room for it, and
the drivers size a local cluster with the same numbers.
"""

from __future__ import annotations

from typing import Any

from leoclr_core.spec.models import EmbedSpec, PretrainSpec, TuneSpec
from leoclr_core.spec.placement import InputPlacement

# What a search trial's own function (Tune's actor that fits the trainer) holds: it only waits,
# but Tune cannot place an actor that asks for nothing.
TRIAL_DRIVER_CPU = 0.01


def data_bundles(spec: PretrainSpec) -> list[dict[str, float]]:
    """The CPUs a pretrain job reserves for its Ray Data tasks before its training workers start
    (a placement group, held for the whole job): one per view worker unless the training workers
    make the views, and one for reading and decoding."""
    s = spec.scaling
    views = [] if InputPlacement.for_ray_workers(spec).views_on_device else [{"CPU": s.data_cpus_per_worker}] * s.data_workers
    return [*views, {"CPU": 1.0}]


def pretrain_cpus(spec: PretrainSpec) -> float:
    """Logical CPUs a pretrain job asks of Ray: its training workers and its data bundles
    (`data_bundles`). A cluster with exactly this many runs it to its end."""
    s = spec.scaling
    return s.num_workers * s.cpus_per_worker + sum(b["CPU"] for b in data_bundles(spec))


def per_trial_cpus(spec: TuneSpec) -> float:
    return pretrain_cpus(spec.trial_spec({})) + TRIAL_DRIVER_CPU


def embed_cpus(spec: EmbedSpec) -> float:
    """Logical CPUs an embed job asks of Ray: its model replicas, its decode tasks, and one for
    Ray Data's reads and the Parquet writer."""
    s = spec.scaling
    return spec.replicas * s.cpus_per_worker + s.data_workers * s.data_cpus_per_worker + 1.0


def job_resources(spec: Any) -> dict[str, float]:
    """{"CPU": n, "GPU": n}: what the job holds at its peak (a search: its concurrent trials)."""
    if spec.kind == "embed":
        sc = spec.scaling
        return {"CPU": embed_cpus(spec), "GPU": spec.replicas * sc.gpus_per_worker if sc.use_gpu else 0.0}
    if spec.kind == "evaluate":
        sc = spec.scaling
        return {"CPU": sc.cpus_per_worker, "GPU": sc.gpus_per_worker if sc.use_gpu else 0.0}
    if spec.kind == "tune":
        # The search's own loop (Tune's controller) runs in the job's driver, which holds no CPU.
        sc, n = spec.base.scaling, spec.max_concurrent_trials
        return {"CPU": n * per_trial_cpus(spec),
                "GPU": n * sc.num_workers * sc.gpus_per_worker if sc.use_gpu else 0.0}
    sc = spec.scaling
    return {"CPU": pretrain_cpus(spec), "GPU": sc.num_workers * sc.gpus_per_worker if sc.use_gpu else 0.0}

