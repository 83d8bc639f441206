"""Optional API keys (Bearer) for every route but /health and the static page."""

from __future__ import annotations

import hmac
import os

from fastapi import Request

from serve_app.errors import AuthenticationError

API_KEYS_ENV = "SERVE_APP_API_KEYS"


def load_api_keys(configured: list[str]) -> tuple[bytes, ...]:
    """Keys from the config plus $SERVE_APP_API_KEYS (comma-separated). Empty: auth is off."""
    from_env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return tuple(k.encode() for k in (*configured, *from_env))


def check_bearer(request: Request, api_keys: tuple[bytes, ...]) -> None:
    if not api_keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    # Compare against every key with compare_digest so timing reveals nothing.
    is_valid = False
    for key in api_keys:
        is_valid |= hmac.compare_digest(given, key)
    if scheme.lower() != "bearer" or not is_valid:
        raise AuthenticationError(
            "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
