"""Serves the static chat page's files from frontend/ without letting a path leave that folder."""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse, Response

from serve_app.errors import APIError


class StaticNotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"


def static_file(root: Path, path: str) -> Response:
    candidate = _find(root.resolve(), path)
    if candidate is None:
        raise not_found(path)
    # The page is tiny and changes with the code: always revalidate.
    return FileResponse(candidate, headers={"Cache-Control": "no-cache"})


def not_found(path: str) -> StaticNotFoundError:
    return StaticNotFoundError(f"Not found: /{path[:200]}", code="not_found")


def _find(root: Path, path: str) -> Path | None:
    # A NUL byte or an over-long name makes the OS calls raise: such a file is simply not there.
    try:
        candidate = (root / (path or "index.html")).resolve()
        if candidate.is_dir():
            candidate = candidate / "index.html"
        is_found = candidate.is_relative_to(root) and candidate.is_file()
    except (ValueError, OSError):
        return None
    return candidate if is_found else None
