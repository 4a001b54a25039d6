"""Every test runs against its own data directory: no test reads or writes ~/.leoclr, a user's
MLflow server or a user's Ray cluster."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LEOCLR_DATA_DIR", str(tmp_path_factory.mktemp("leoclr-data")))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS", "LEOCLR_STORAGE_PATH"):
        mp.delenv(var, raising=False)
    yield
    mp.undo()
