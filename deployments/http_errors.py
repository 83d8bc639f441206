"""Every failure the ingress can meet, answered in OpenAI's error shape with the right status."""

from __future__ import annotations

import functools
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.metrics import record_error
from serve_app.errors import APIError, RateLimitError, ServiceUnavailableError, error_body
from serve_app.protocol import ErrorResponse

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
_BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's wording


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    app.openapi = functools.partial(_openapi_with_errors, app)  # type: ignore[method-assign]


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


def _count(request: Request, status: int) -> None:
    # Routes set request.state.model once the body names one; record per model and status.
    record_error(getattr(request.state, "model", "none"), status)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    _count(request, exc.status_code)
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    _count(request, 400)
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


_UNION_TAGS = {"str", "int", "float", "bool"}


def _param_name(location: list[str]) -> str | None:
    # pydantic appends the union branch that failed ("str", "list[int]"); drop it, and only it:
    # "stream" and "stream_options" start with "str" too.
    names = [part for part in location if part not in _UNION_TAGS and "[" not in part]
    return ".".join(names) or None


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, APIError):  # FastAPI wraps errors raised while reading a body
        return await _api_error(request, exc.__cause__)
    _count(request, exc.status_code)
    if exc.detail == _BODY_PARSE_ERROR and exc.__cause__ is not None:
        # json.loads failed on more than syntax: invalid UTF-8, nesting too deep, huge integer.
        message = f"We could not parse the JSON body of your request: {exc.__cause__}"[:500]
        return JSONResponse(error_body(message, "invalid_request_error", None, "invalid_json"), 400)
    error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse(
        error_body(message, error_type), status_code=exc.status_code, headers=exc.headers
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    _count(request, 500)
    logger.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


# ---- OpenAPI: document the errors we send, not FastAPI's 422 we never send ----------------

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
# One event of the stream (OpenAPI 3.1: `schema` describes each event): `data` is a chunk's JSON,
# an {"error": ...} after a failure, or the final "[DONE]".
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
_OTHER_RESPONSES = {"/health": {"503": "Some model is not ready (lists them in `not_ready`)."}}


def _openapi_with_errors(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # builds and caches app.openapi_schema
        error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(error_schema.pop("$defs", {}), ErrorResponse=error_schema)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                _document_operation(path, operation, components)
    return app.openapi_schema or {}


def _document_operation(path: str, operation: dict[str, Any], components: dict[str, Any]) -> None:
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
    ref = body.get("schema", {}).get("$ref", "")
    is_generation = "stream" in components.get(ref.rpartition("/")[2], {}).get("properties", {})
    responses = operation["responses"]
    responses.pop("422", None)
    for status, description in _error_statuses(path, operation, is_generation).items():
        responses[status] = {
            "description": description,
            "content": {"application/json": {"schema": _ERROR_REF}},
        }
    for status, description in _OTHER_RESPONSES.get(path, {}).items():
        responses[status] = {"description": description, "content": {"application/json": {}}}
    if is_generation:  # `stream: true` answers server-sent events
        responses["200"]["content"]["text/event-stream"] = {"schema": _SSE_EVENT}


def _error_statuses(path: str, operation: dict[str, Any], is_generation: bool) -> dict[str, str]:
    has_body, has_params = "requestBody" in operation, bool(operation.get("parameters"))
    statuses = {"500": "Unexpected server error."}
    if path.startswith(("/v1/", "/admin/")):
        statuses["401"] = "Missing or invalid API key (when keys are configured)."
    if path.startswith("/admin/"):
        statuses["403"] = "An API key where admin keys are configured (only they open /admin)."
    if path == "/admin/models" and has_body:
        statuses["409"] = "A model with this id exists."
    if has_body or has_params:
        statuses["400"] = "Invalid body or parameter (named in `param`)."
        statuses["404"] = "Unknown model."
    if has_body:
        statuses["413"] = "Request body over the size limit."
        statuses["429"] = "The model is at capacity; retry after Retry-After seconds."
        statuses["503"] = "The model failed to load, or its replica failed."
    if is_generation:
        statuses["504"] = "Generation exceeded the request deadline."
    return statuses
