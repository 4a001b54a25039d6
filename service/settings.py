"""The service's settings, from the environment (pydantic-settings). Extends the training side's."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field

from leoclr_core.settings import CoreSettings


class ServiceSettings(CoreSettings):
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("LEOCLR_DATABASE_URL"),
        description="Job store (SQLAlchemy URL, e.g. postgresql+psycopg://...); default sqlite:///<data dir>/jobs.db.",
    )
    api_token: str | None = Field(
        default=None, validation_alias=AliasChoices("LEOCLR_API_TOKEN"),
        description="Bearer token of the API; unset: generated into <data dir>/api-token (mode 0600).",
    )
    max_body_bytes: int = Field(
        default=1_048_576, validation_alias=AliasChoices("LEOCLR_MAX_BODY_BYTES"),
        description="Largest request body accepted, in bytes.",
    )

    ray_jobs_address: str | None = Field(
        default=None, validation_alias=AliasChoices("LEOCLR_RAY_JOBS_ADDRESS"),
        description="Ray Jobs API (the dashboard's HTTP address, e.g. http://ray-head:8265); unset: asked of "
                    "the cluster at RAY_ADDRESS, or with neither, an embedded Ray head is started on 127.0.0.1.",
    )

    data_roots: str | None = Field(
        default=None, validation_alias=AliasChoices("LEOCLR_DATA_ROOTS"),
        description="Folders a job submitted over the API may read data from (separated by ':'); "
                    "default <data dir>/datasets.",
    )
    api_url: str = Field(
        default="http://127.0.0.1:8000", validation_alias=AliasChoices("LEOCLR_API_URL"),
        description="Where the client commands (leoclr submit, status, logs, cancel, models) find the API.",
    )

    @property
    def allowed_data_roots(self) -> list[Path]:
        if not self.data_roots:
            return [self.home / "datasets"]
        return [Path(p).expanduser().resolve() for p in self.data_roots.split(os.pathsep) if p]

    @property
    def job_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'jobs.db'}"

    @property
    def token_file(self) -> Path:
        return self.home / "api-token"
