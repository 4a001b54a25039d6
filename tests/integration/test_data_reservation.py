"""A pretrain job on a Ray cluster with exactly the CPUs `job_resources` says it needs, its views
made by Ray Data's CPU workers: it holds all of them while it trains (its data CPUs reserved
before its training workers start, so no training worker, its own or another job's, can take
them) and runs to its end."""

from __future__ import annotations

import pytest

from leoclr_core.spec.resources import job_resources
from leoclr_core.spec.models import parse_spec
from leoclr_core.training.callbacks import Callbacks

from .conftest import tiny_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def cpu_views_spec(tmp_path):
    return parse_spec(tiny_spec("exact-cpus", tmp_path, augment={"batched": True, "device": "cpu"},
                                scaling={"num_workers": 2, "data_workers": 1, "data_compute": "tasks"},
                                register={"model_name": None}))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Exactly the CPUs the job asks for (2 training workers, 1 view worker, 1 for reads: 4)."""
    import ray

    cpus = job_resources(cpu_views_spec(tmp_path_factory.mktemp("spec")))["CPU"]
    assert cpus == int(cpus) == 4
    ctx = ray.init(address="local", num_cpus=int(cpus), _node_ip_address="127.0.0.1", include_dashboard=False,
                   log_to_driver=False)
    yield ctx.address_info["address"]
    ray.shutdown()


class FreeCpus(Callbacks):
    """The cluster's unreserved CPUs as the driver sees them when training starts and after each epoch."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def _look(self) -> None:
        import ray

        self.seen.append(ray.available_resources().get("CPU", 0.0))

    def on_start(self, state) -> None:
        self._look()

    def on_epoch(self, record, state) -> None:
        self._look()


def test_a_job_on_exactly_the_cpus_it_asks_for_holds_them_all_and_runs_to_its_end(ray_cluster, tmp_path):
    from leoclr_core.distributed.pretrain import run_pretrain

    spec = cpu_views_spec(tmp_path)
    free = FreeCpus()

    run = run_pretrain(spec, callbacks=free)

    assert run.state.final["epoch"] == spec.optim.epochs and len(run.state.history) == spec.optim.epochs
    # Nothing left for another job's workers to take: the data CPUs are held, not just hoped for.
    assert free.seen and set(free.seen) == {0.0}, free.seen
