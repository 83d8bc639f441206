"""Every failure the ingress can meet, answered in OpenAI's error shape with the right status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.errors import APIError, RateLimitError, ServiceUnavailableError, error_body
from serve_app.openai_adapter import Rejected

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)


def rejected_to_error(rejected: Rejected) -> APIError:
    error = APIError(rejected.message, param=rejected.param, code=rejected.code)
    error.status_code = rejected.status_code
    error.error_type = rejected.error_type
    return error


def upstream_error(model_id: str, exc: BaseException) -> APIError:
    """A model replica could not take or finish the call: overloaded, dead or restarting."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackPressureError):
        return RateLimitError(
            f"Model '{model_id}' is at capacity; retry shortly.",
            code="model_overloaded",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    logger.warning("model %s failed: %r", model_id, exc)
    return ServiceUnavailableError(
        f"Model '{model_id}' failed while serving the request ({type(exc).__name__}); retry.",
        code="model_unavailable",
        headers={"Retry-After": RETRY_AFTER_S},
    )


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first: dict[str, Any] = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        message = "We could not parse the JSON body of your request: " + str(first.get("msg"))
        return JSONResponse(error_body(message, "invalid_request_error", None, "invalid_json"), 400)
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = _param_name(location)
    message = f"{'.'.join(location) or 'body'}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), 400)


def _param_name(location: list[str]) -> str | None:
    # pydantic appends the union branch that failed ("str", "list[...]"); drop it.
    names = [part for part in location if not (part.startswith(("list[", "str", "int")))]
    return ".".join(names) or None


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, APIError):  # FastAPI wraps errors raised while reading a body
        return await _api_error(request, exc.__cause__)
    error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse(
        error_body(message, error_type), status_code=exc.status_code, headers=exc.headers
    )


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
