"""Optional API keys (Bearer), checked by a pure ASGI middleware before anything reads the body,
on every path but /health and GETs of the page (anything outside /v1 and /admin)."""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.metrics import record_error
from serve_app.errors import AuthenticationError

logger = logging.getLogger(__name__)

API_KEYS_ENV = "SERVE_APP_API_KEYS"
API_PREFIXES = ("/v1", "/admin")  # every route under these needs a key, present or future
PUBLIC_PATHS = frozenset({"/health"})
_PAGE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """The accepted keys. `is_required` stays true when keys were configured but none is usable
    (all blank): then nothing authenticates, rather than auth silently turning off."""

    keys: tuple[bytes, ...] = ()
    is_required: bool = False

    def accepts(self, authorization: bytes) -> bool:
        scheme, _, token = authorization.partition(b" ")
        given = token.strip()
        # Compare against every key with compare_digest so timing reveals nothing.
        is_valid = False
        for key in self.keys:
            is_valid |= hmac.compare_digest(given, key)
        return scheme.lower() == b"bearer" and bool(given) and is_valid


KeySource = Callable[[], ApiKeys]


def load_api_keys(configured: list[str]) -> ApiKeys:
    """Keys from the config plus $SERVE_APP_API_KEYS (comma-separated); blank ones are dropped.
    None configured anywhere: auth is off."""
    from_env = os.environ.get(API_KEYS_ENV, "").split(",")
    keys = tuple(dict.fromkeys(k.strip().encode() for k in (*configured, *from_env) if k.strip()))
    if configured and not keys:
        logger.error("api_keys are configured but all blank: every API request is refused")
    return ApiKeys(keys, is_required=bool(keys) or bool(configured))


def is_public(method: str, path: str) -> bool:
    """/health, and GETs of anything outside the API (the page, its files, /docs)."""
    if path in PUBLIC_PATHS:
        return True
    is_api = any(path == p or path.startswith(p + "/") for p in API_PREFIXES)
    return method in _PAGE_METHODS and not is_api


class BearerAuth:
    """Answers 401 (OpenAI shape, WWW-Authenticate) before the request reaches the body limit,
    validation or any route. `api_keys` is called per request: the ingress reads its replica's."""

    def __init__(self, app: ASGIApp, api_keys: KeySource) -> None:
        self.app = app
        self.api_keys = api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["method"], _route_path(scope)):
            await self.app(scope, receive, send)
            return
        keys = self.api_keys()
        if keys.is_required and not keys.accepts(_header(scope, b"authorization")):
            record_error("none", 401)
            await _unauthorized()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _header(scope: Scope, name: bytes) -> bytes:
    return next((value for key, value in scope["headers"] if key.lower() == name), b"")


def _unauthorized() -> JSONResponse:
    error = AuthenticationError(
        "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)
