"""Every test runs against its own data directory: no test reads or writes ~/.leoclr, a user's
MLflow server or a user's Ray cluster."""

import pytest

ALONGSIDE = ("unit", "deploy")  # test folders whose tests start no cluster and no service


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `pytest -n 2 --dist loadscope` (make test), every test that starts Ray or a service
    runs on one worker, in file order, as in a plain run (module-scoped clusters stay shared, no two
    clusters compete): those tests leave much of a 2-core machine idle while they wait on processes,
    and the tests of ALONGSIDE run on the other worker meanwhile, one at a time. (xdist's own
    xdist_group marks do not reach its scheduler under pytest 9.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ClusterTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            parts = nodeid.split("/")
            return nodeid if len(parts) > 2 and parts[1] in ALONGSIDE else "cluster"

    return ClusterTestsTogether(config, log)


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
