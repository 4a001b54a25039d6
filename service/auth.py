"""Bearer-token auth: one token, compared in constant time. With none configured, the embedded
service generates one into the data directory (mode 0600) and says where."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from fastapi import HTTPException, Request, status

log = logging.getLogger(__name__)


def ensure_token(configured: str | None, token_file: Path) -> str:
    if configured:
        return configured
    if token_file.is_file():
        return token_file.read_text().strip()
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    log.warning("generated an API token in %s (mode 0600)", token_file)
    return token


def require_token(request: Request) -> None:
    expected: str = request.app.state.token
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
