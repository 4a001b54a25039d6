"""Every test runs against its own data directory: no test reads or writes ~/.leoclr, a user's
MLflow server or a user's Ray cluster."""

import pytest

ALONGSIDE = ("unit", "deploy")  # test folders whose tests start no cluster and no service
# Modules of the other tiers that start no Ray cluster (only servers of their own: MLflow, S3, a
# service told to find no head), so they need not wait their turn with the cluster tests.
ALONGSIDE_MODULES = ("integration/test_tracking.py", "integration/test_s3.py", "e2e/test_serve_without_ray.py")
# The tests that start Ray or a service, in two groups; each runs on one worker, in file order.
# The first starts at once; the second only once the other worker is through the ALONGSIDE tests.
CLUSTER_GROUPS = ("integration", "e2e")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `pytest -n 2 --dist loadscope` (make test): one worker runs the integration tests (Ray
    clusters, one per module), the other the unit tests, then the end-to-end tests (services, each
    with a head of its own). Each group keeps file order and its module-scoped clusters and
    services, and at most two clusters run at once. The unit tests take about a third of the run,
    and the cluster tests leave much of a 2-core machine idle while they wait on processes, so
    putting the end-to-end tests after the unit tests rather than after the integration tests
    shortens the run. (xdist's own xdist_group marks do not reach its scheduler under pytest 9.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    def rank(scope: str) -> int:
        return {CLUSTER_GROUPS[0]: 0, CLUSTER_GROUPS[1]: 2}.get(scope, 1)

    class ClusterGroupsAroundTheRest(LoadScopeScheduling):
        ranked = False

        def _split_scope(self, nodeid: str) -> str:
            folder, _, rest = nodeid.partition("tests/")[2].partition("/")
            if folder in ALONGSIDE or f"{folder}/{rest.partition('::')[0]}" in ALONGSIDE_MODULES:
                return nodeid
            return folder if folder in CLUSTER_GROUPS else CLUSTER_GROUPS[0]

        def _assign_work_unit(self, node) -> None:
            # schedule() builds the queue once, ordered by size: put the first group first and the
            # second last, once, before the first unit is handed out.
            if not self.ranked:
                for scope in sorted(self.workqueue, key=rank):
                    self.workqueue.move_to_end(scope)
                self.ranked = True
            super()._assign_work_unit(node)

    return ClusterGroupsAroundTheRest(config, log)


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LEOCLR_DATA_DIR", str(tmp_path_factory.mktemp("leoclr-data")))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS", "LEOCLR_STORAGE_PATH"):
        mp.delenv(var, raising=False)
    yield
    mp.undo()


# The production backends as real servers (tests/backends.py), started once per session on first use.

@pytest.fixture(scope="session")
def postgres():
    from tests.backends import start_postgres

    server, stop = start_postgres()
    yield server
    stop()


@pytest.fixture(scope="session")
def s3():
    from tests.backends import start_s3

    server, stop = start_s3()
    yield server
    stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def job_database(request, tmp_path):
    """A job store URL: a SQLite file (the embedded default) and, in a second run of the test, a fresh
    database on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres").database("jobs")
