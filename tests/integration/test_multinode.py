"""Two Ray nodes on this machine (`ray.cluster_utils.Cluster`): the two training workers are placed
on different nodes (STRICT_SPREAD) and a short run completes with checkpoints in one shared path,
its views made by the workers from streamed images (the data flow GPU workers use)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from leoclr_core.spec.models import parse_spec

from .conftest import tiny_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    from leoclr_core.distributed.session import connect
    from service.cluster import ensure_auth_token

    # Cluster starts its nodes as `ray start` does, which with token auth needs the token to exist
    # (ray.init makes its own; this fixture may be the first Ray on a fresh machine).
    ensure_auth_token(str(Path(sys.executable).with_name("ray")))
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    connect(cluster.address)
    yield cluster
    import ray

    ray.shutdown()
    cluster.shutdown()


def test_workers_on_two_nodes_share_one_storage_path(two_nodes, tmp_path):
    import ray

    from leoclr_core.distributed.pretrain import run_pretrain

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    shared = tmp_path / "shared-storage"  # what NFS or s3:// is to a real cluster
    # augment.device gpu: Ray Data streams images and each worker makes its views on its own device
    # (the GPU path's data flow, here on CPU tensors)
    spec = parse_spec(tiny_spec("two-nodes", tmp_path, scaling={"placement_strategy": "STRICT_SPREAD"},
                                augment={"device": "gpu"},
                                checkpoint={"every": 1, "keep": 2, "storage_path": str(shared)}))
    run = run_pretrain(spec)
    assert len(run.worker_nodes) == 2 and len(set(run.worker_nodes)) == 2
    assert run.state.final["epoch"] == 2
    assert sorted(p.name for p in (shared / "two-nodes").iterdir() if p.name.startswith("epoch-")) == \
        ["epoch-0001", "epoch-0002"]
    assert run.encoder is not None and run.encoder.version == "1"
