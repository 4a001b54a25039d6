"""The service's settings, from the environment (pydantic-settings). Extends the client's (the token and the API's URL), which extends the training side's."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import AliasChoices, Field

from leoclr_core.settings import ClientSettings


class ServiceSettings(ClientSettings):
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("LEOCLR_DATABASE_URL"),
        description="Job store (SQLAlchemy URL, e.g. postgresql+psycopg://...); default sqlite:///<data dir>/jobs.db.",
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

    max_running_jobs: int | None = Field(
        default=None, ge=1, le=10_000, validation_alias=AliasChoices("LEOCLR_MAX_RUNNING_JOBS"),
        description="Jobs handed to Ray at once; more wait `queued` in the service, in order of submission. "
                    "Default: half the cluster's CPUs (at least 1): each job's driver also takes memory on the head.",
    )
    cluster_max_resources: str | None = Field(
        default=None, validation_alias=AliasChoices("LEOCLR_CLUSTER_MAX_RESOURCES"),
        description="What the cluster can grow to with an autoscaler, e.g. CPU=256,GPU=32 (a job asking for more is "
                    "refused at submit); unset: what Ray reports now.",
    )
    ray_lost_after_s: float = Field(
        default=30.0, gt=0, le=86_400, validation_alias=AliasChoices("LEOCLR_RAY_LOST_AFTER_S"),
        description="Seconds the Ray Jobs API may stay unreachable before the jobs it was running are marked `lost`.",
    )
    head_restarts: int = Field(
        default=5, ge=0, le=100, validation_alias=AliasChoices("LEOCLR_HEAD_RESTARTS"),
        description="Times in a row the service restarts its embedded Ray head when it dies before it gives up "
                    "(and /readyz stays 503).",
    )

    data_roots: str | None = Field(
        default=None, validation_alias=AliasChoices("LEOCLR_DATA_ROOTS"),
        description="Folders a job submitted over the API may read data from (separated by ':'); "
                    "default <data dir>/datasets.",
    )

    @property
    def max_resources(self) -> dict[str, float] | None:
        """LEOCLR_CLUSTER_MAX_RESOURCES as {"CPU": 256.0, "GPU": 32.0}; a malformed value is an error naming it."""
        if not self.cluster_max_resources:
            return None
        out: dict[str, float] = {}
        for item in self.cluster_max_resources.split(","):
            name, sep, value = item.partition("=")
            try:
                if not sep or not name.strip():
                    raise ValueError
                out[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"LEOCLR_CLUSTER_MAX_RESOURCES: {item!r} is not NAME=NUMBER "
                                 "(e.g. CPU=256,GPU=32)") from None
        return out

    @property
    def allowed_data_roots(self) -> list[Path]:
        if not self.data_roots:
            return [self.home / "datasets"]
        return [Path(p).expanduser().resolve() for p in self.data_roots.split(os.pathsep) if p]

    @property
    def job_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'jobs.db'}"


# Query parameters that may carry a credential (pyarrow's s3://...?secret_key=, a token in a URI).
_SECRET_PARAM = re.compile(r"pass|secret|token|key|signature|credential|auth", re.IGNORECASE)


def masked_uri(uri: str) -> str:
    """`uri` fit for logs: a password in it (scheme://user:password@host) and query parameters that may
    hold a credential shown as ***; the rest kept as written (urlunsplit would turn sqlite:////path
    into sqlite://path)."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unclosed [ of an IPv6 host: whatever it holds, not shown
        return "(not a valid URI)"
    out = uri
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        if has_password:
            out = out.replace(f"//{parts.netloc}", f"//{user}:***@{host}", 1)
    if parts.query and any(_SECRET_PARAM.search(k) for k, _ in parse_qsl(parts.query, keep_blank_values=True)):
        query = urlencode([(k, "***" if _SECRET_PARAM.search(k) else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*/:")
        out = out.replace(f"?{parts.query}", f"?{query}", 1)
    return out
