"""Typed API errors and the one mapping to OpenAI's `{"error": {message, type, param, code}}`."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(APIError):
    status_code = 403
    error_type = "permission_error"


class ConflictError(APIError):
    status_code = 409
    error_type = "invalid_request_error"


class ModelNotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        shown = model if len(model) <= 100 else model[:100] + "..."  # never echo a huge name
        super().__init__(
            f"The model '{shown}' does not exist. GET /v1/models lists the served models.",
            param="model",
            code="model_not_found",
        )


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"


class RateLimitError(APIError):
    status_code = 429
    error_type = "rate_limit_error"


class GenerationTimeoutError(APIError):
    status_code = 504
    error_type = "timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="request_timeout")


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "service_unavailable"


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
