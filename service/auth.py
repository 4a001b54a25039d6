"""Bearer-token auth: one token, compared in constant time. With none configured, the embedded
service generates one into the data directory (mode 0600) and says where.

The token is checked twice: by `BearerAuth`, a plain ASGI middleware, before FastAPI reads a body
(so an unauthenticated request gets 401 whatever it sends, never a validation error that
describes the API), and by `require_token` on each route, which also puts the scheme in the
OpenAPI document.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

log = logging.getLogger(__name__)

# Paths anyone may read: probes, and the API's own description.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
UNAUTHORIZED = "missing or wrong bearer token"

bearer = HTTPBearer(auto_error=False, description="The service's API token (LEOCLR_API_TOKEN, or the one "
                                                  "`leoclr serve` wrote to <data dir>/api-token).")


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


def valid(authorization: bytes | str, expected: str) -> bool:
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1", "replace")
    scheme, _, given = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(given, expected.encode())


class BearerAuth:
    """Refuses a request to anything but PUBLIC_PATHS without the token (read from the app's state,
    set at startup) before the app sees its body."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            expected = scope["app"].state.token
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not valid(header, expected):
                response = JSONResponse({"detail": UNAUTHORIZED}, status.HTTP_401_UNAUTHORIZED,
                                        headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def the_token(request: Request) -> str:
    return request.app.state.token  # set in the lifespan, as BearerAuth reads it


async def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                        token: Annotated[str, Depends(the_token)]) -> None:
    # async: a check this small is not worth the hop to a worker thread a plain def dependency costs
    if credentials is None or not valid(f"Bearer {credentials.credentials}", token):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
