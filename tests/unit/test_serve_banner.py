"""What `leoclr serve` says at start about its backends (service.serve.describe_backends): where
the job store, MLflow and the checkpoints are, never a password or a secret key."""

from __future__ import annotations

from service.serve import describe_backends
from service.settings import ServiceSettings, masked_uri
from tests.backends import S3_SECRET


def test_production_backends_are_named_with_their_secrets_masked(tmp_path):
    s = ServiceSettings(data_dir=tmp_path, database_url="postgresql://leoclr:db-pass-9@db.internal:5432/leoclr",
                        mlflow_tracking_uri="https://alice:ml-pass-7@mlflow.internal:5000",
                        storage_path="s3://checkpoints/leoclr")
    environ = {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_ACCESS_KEY_ID": "leoclr-test-key",
               "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    lines = describe_backends(s, environ)
    assert lines == [
        "job store: postgresql+psycopg://leoclr:***@db.internal:5432/leoclr",  # the driver it will use
        "MLflow: https://alice:***@mlflow.internal:5000",
        "checkpoints: s3://checkpoints/leoclr at http://127.0.0.1:8333 (AWS_ENDPOINT_URL)",
    ]
    text = "\n".join(lines)
    assert not any(secret in text for secret in ("db-pass-9", "ml-pass-7", S3_SECRET, "leoclr-test-key"))

    s3_secrets = ServiceSettings(data_dir=tmp_path, storage_path=f"s3://AKIA:{S3_SECRET}@b/p?secret_key={S3_SECRET}")
    assert S3_SECRET not in "\n".join(describe_backends(s3_secrets, {}))
    assert describe_backends(s3_secrets, {})[2].endswith("at AWS (AWS_ENDPOINT_URL unset)")


def test_embedded_defaults_are_named_with_the_variable_that_moves_each_out(tmp_path, monkeypatch):
    for name in ("LEOCLR_DATABASE_URL", "MLFLOW_TRACKING_URI", "LEOCLR_STORAGE_PATH"):  # an earlier test's, in this process
        monkeypatch.delenv(name, raising=False)
    job_store, mlflow, checkpoints = describe_backends(ServiceSettings(data_dir=tmp_path), {})
    home = tmp_path.resolve()
    assert job_store == f"job store: sqlite:///{home}/jobs.db (SQLite, embedded; LEOCLR_DATABASE_URL moves it to a server)"
    assert mlflow == f"MLflow: sqlite:///{home}/mlflow.db (SQLite, embedded; MLFLOW_TRACKING_URI moves it to a server)"
    assert checkpoints.startswith(f"checkpoints: {home}/ray (a local folder; LEOCLR_STORAGE_PATH moves it")


def test_masked_uri_keeps_where_and_hides_with_what():
    assert masked_uri("http://u:p@ss:w@h:5000/x?token=t&run=1") == "http://u:***@h:5000/x?token=***&run=1"
    assert masked_uri("postgresql+psycopg://u@h/db?password=z&sslmode=require") == \
        "postgresql+psycopg://u@h/db?password=***&sslmode=require"
    assert masked_uri("http://u:secret@[::1") == "(not a valid URI)"
    for plain in ("http://[::1]:5000", "databricks", "/mnt/nfs/ckpt", "gs://b/p", "ray://head:10001"):
        assert masked_uri(plain) == plain
