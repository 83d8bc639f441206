"""Serves the static chat page's files from frontend/ without letting a path leave that folder."""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse, Response

from serve_app.errors import APIError


class StaticNotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"


def static_file(root: Path, path: str) -> Response:
    root = root.resolve()
    candidate = (root / (path or "index.html")).resolve()
    if candidate.is_dir():
        candidate = candidate / "index.html"
    if not candidate.is_relative_to(root) or not candidate.is_file():
        raise StaticNotFoundError(f"Not found: /{path}", code="not_found")
    # The page is tiny and changes with the code: always revalidate.
    return FileResponse(candidate, headers={"Cache-Control": "no-cache"})
