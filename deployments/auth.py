"""Optional API keys (Bearer), checked by a pure ASGI middleware before anything reads the body,
on every path but /health and GETs of the page (anything outside /v1 and /admin). /admin takes
its own keys when admin keys are configured."""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.metrics import record_error
from serve_app.errors import AuthenticationError, PermissionDeniedError

logger = logging.getLogger(__name__)

API_KEYS_ENV = "SERVE_APP_API_KEYS"
ADMIN_API_KEYS_ENV = "SERVE_APP_ADMIN_API_KEYS"
ADMIN_PREFIX = "/admin"
API_PREFIXES = ("/v1", ADMIN_PREFIX)  # every route under these needs a key, present or future
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


@dataclass(frozen=True, slots=True)
class AccessKeys:
    """The API keys, and the admin keys that alone open /admin when any are configured."""

    api: ApiKeys = ApiKeys()
    admin: ApiKeys | None = None  # None: /admin takes the API keys

    def for_path(self, path: str) -> ApiKeys:
        if self.admin is not None and _is_under(path, ADMIN_PREFIX):
            return self.admin
        return self.api


KeySource = Callable[[], ApiKeys | AccessKeys]


def load_api_keys(configured: list[str], env: str = API_KEYS_ENV) -> ApiKeys:
    """Keys from the config plus $SERVE_APP_API_KEYS (comma-separated); blank ones are dropped.
    None configured anywhere: auth is off."""
    from_env = os.environ.get(env, "").split(",")
    keys = tuple(dict.fromkeys(k.strip().encode() for k in (*configured, *from_env) if k.strip()))
    if configured and not keys:
        logger.error("%s keys are configured but all blank: every such request is refused", env)
    return ApiKeys(keys, is_required=bool(keys) or bool(configured))


def load_access_keys(api_keys: list[str], admin_api_keys: list[str]) -> AccessKeys:
    admin = load_api_keys(admin_api_keys, ADMIN_API_KEYS_ENV)
    return AccessKeys(load_api_keys(api_keys), admin if admin.is_required else None)


def is_public(method: str, path: str) -> bool:
    """/health, and GETs of anything outside the API (the page, its files, /docs)."""
    if path in PUBLIC_PATHS:
        return True
    is_api = any(_is_under(path, p) for p in API_PREFIXES)
    return method in _PAGE_METHODS and not is_api


def _is_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


class BearerAuth:
    """Answers 401 (OpenAI shape, WWW-Authenticate) before the request reaches the body limit,
    validation or any route. `api_keys` is called per request: the ingress reads its replica's."""

    def __init__(self, app: ASGIApp, api_keys: KeySource) -> None:
        self.app = app
        self.api_keys = api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["method"], _route_path(scope)):
            await self.app(scope, receive, send)  # lifespan and websocket scopes too
            return
        path = _route_path(scope)
        access = self.api_keys()
        access = access if isinstance(access, AccessKeys) else AccessKeys(access)
        keys, authorization = access.for_path(path), _header(scope, b"authorization")
        if keys.is_required and not keys.accepts(authorization):
            # A good API key on /admin, where only admin keys are taken: forbidden, not unknown.
            is_api_key = keys is not access.api and access.api.accepts(authorization)
            record_error("none", 403 if is_api_key else 401)
            await (_forbidden() if is_api_key else _unauthorized())(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _header(scope: Scope, name: bytes) -> bytes:
    return next((value for key, value in scope["headers"] if key.lower() == name), b"")


def _forbidden() -> JSONResponse:
    error = PermissionDeniedError(
        "This API key cannot use /admin: send an admin key.", code="admin_key_required"
    )
    return JSONResponse(error.to_dict(), status_code=error.status_code)


def _unauthorized() -> JSONResponse:
    error = AuthenticationError(
        "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)
