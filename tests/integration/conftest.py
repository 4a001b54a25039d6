"""Integration tier: real Ray (one cluster per module), real MLflow on SQLite, tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import leoclr_core.distributed  # noqa: E402,F401 - sets Ray's environment before Ray is imported


def tiny_spec(name: str, tmp_path, **sections: Any) -> dict[str, Any]:
    """A pretrain spec that trains in seconds per epoch on 2 CPU cores."""
    spec: dict[str, Any] = {
        "kind": "pretrain", "name": name, "method": "leoclr",
        "data": {"num_images": 512, "num_test_images": 128, "image_size": 16,
                 "synthetic": {"source_size": 32, "object_size": [13, 19], "chroma": 0.25, "clutter": 6}},
        "model": {"backbone": "tiny", "width": 8, "proj_hidden_dim": 64, "proj_dim": 32},
        "loss": {"queue_size": 128},
        "augment": {"batched": True},
        "optim": {"epochs": 2, "batch_size": 64},
        "scaling": {"num_workers": 2, "log_every": 2},
        "eval": {"knn_every": 0, "knn_k": 20},
        "checkpoint": {"every": 1, "keep": 2},
        "register": {"model_name": f"{name}-encoder", "alias": "candidate"},
        "output_dir": str(tmp_path / "runs" / name),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            spec[key] = {**spec.get(key, {}), **value}
        else:
            spec[key] = value
    return spec


def upload(s3, bucket: str, root: Path, prefix: str) -> str:
    """Every file under `root` (a test's images or Parquet files) to s3://bucket/prefix/<its
    relative path>; that URI."""
    client = s3.client()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def ray_node_env() -> dict[str, str]:
    """Variables the module's Ray node starts with; a module overrides this fixture to give them
    (the S3 variables: on a real cluster each node has the storage credentials in its own
    environment, never in a job's runtime_env, which the dashboard shows)."""
    return {}


@pytest.fixture(scope="module")
def ray_cluster(ray_node_env):
    """A local Ray for the whole module (starting one costs seconds; a Train run about 40 s). Its
    node (raylet and workers) inherits this process's environment, with `ray_node_env` set in it
    for the module; the drivers the module starts inherit the same."""
    import ray

    mp = pytest.MonkeyPatch()
    for key, value in ray_node_env.items():
        mp.setenv(key, value)
    try:
        ctx = ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
                       log_to_driver=False)
        yield ctx.address_info["address"]
        ray.shutdown()
    finally:
        mp.undo()
