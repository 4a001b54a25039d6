"""Request and response bodies of the REST API (explicit, versioned under /v1)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    name: str
    status: str
    error: str | None = None
    result: dict[str, Any] | None = None  # the driver's final JSON line: metrics, registry URI
    created_at: datetime
    updated_at: datetime
    spec: dict[str, Any]


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int
