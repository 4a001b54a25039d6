"""Where a job's state lives, read from the environment (pydantic-settings; no torch here).

Embedded defaults put everything under one data directory: MLflow's SQLite database and
artifact folder, and Ray Train's storage. One variable each moves a part out (ARCHITECTURE.md).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoreSettings(BaseSettings):
    """The environment variables the training side reads."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    data_dir: Path = Field(
        default=Path("~/.leoclr"),
        validation_alias=AliasChoices("LEOCLR_DATA_DIR"),
        description="Data directory of the embedded defaults (MLflow database and artifacts, Ray storage).",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI"),
        description="MLflow tracking server or database; default sqlite:///<data dir>/mlflow.db.",
    )
    ray_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("RAY_ADDRESS"),
        description="Ray cluster to run on; unset: a local Ray is started for the run (127.0.0.1, token auth).",
    )
    storage_path: str | None = Field(
        default=None,
        validation_alias=AliasChoices("LEOCLR_STORAGE_PATH"),
        description="Ray Train storage for checkpoints (NFS path, s3://, gs://); default <data dir>/ray.",
    )

    @property
    def home(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        """Artifact folder for experiments this project creates on a local (SQLite) tracking store."""
        return self.home / "mlartifacts"

    @property
    def ray_storage(self) -> str:
        return self.storage_path or str(self.home / "ray")


def prepare_sqlite(url: str) -> None:
    """Create the folder of a `sqlite:///` database (SQLAlchemy and MLflow do not); other URLs: nothing."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


class ClientSettings(CoreSettings):
    """The variables the client commands read (the service reads the same ones: the token it
    accepts, and the data directory it writes the generated token into)."""

    api_token: str | None = Field(
        default=None, validation_alias=AliasChoices("LEOCLR_API_TOKEN"),
        description="Bearer token of the API; unset: generated into <data dir>/api-token (mode 0600).",
    )
    api_url: str = Field(
        default="http://127.0.0.1:8000", validation_alias=AliasChoices("LEOCLR_API_URL"),
        description="Where the client commands (leoclr submit, status, logs, cancel, models) find the API.",
    )

    @property
    def token_file(self) -> Path:
        return self.home / "api-token"


def core_settings() -> CoreSettings:
    """Read afresh each call, so that tests and the service can change the environment."""
    return CoreSettings()
