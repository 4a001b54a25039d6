from pathlib import Path

from leoclr_core.settings import CoreSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_put_everything_under_the_data_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("LEOCLR_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LEOCLR_STORAGE_PATH", raising=False)
    s = CoreSettings()
    assert s.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert s.ray_storage == str(tmp_path / "ray") and s.artifact_root == tmp_path / "mlartifacts"


def test_one_variable_moves_each_part_out(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("LEOCLR_STORAGE_PATH", "s3://bucket/ray")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    s = CoreSettings()
    assert (s.tracking_uri, s.ray_storage, s.ray_address) == ("http://mlflow:5000", "s3://bucket/ray", "10.0.0.1:6379")


def test_every_variable_is_documented_in_the_readme():
    from service.settings import ServiceSettings

    text = README.read_text()
    for field in ServiceSettings.model_fields.values():  # CoreSettings' fields and the service's
        for name in field.validation_alias.choices:  # type: ignore[union-attr]
            assert f"`{name}`" in text, f"{name} is read by CoreSettings but not documented in README.md"
