"""Request size limits as a pure ASGI middleware: headers (431) and body (413), OpenAI shape.

Ray Serve's proxy forwards headers of any size, so the ingress enforces the header limit itself.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import APIError, PayloadTooLargeError


class HeadersTooLargeError(APIError):
    status_code = 431
    error_type = "invalid_request_error"


class BodySizeLimit:
    """Refuses headers over max_header_bytes and a declared Content-Length over max_bytes at
    once, and cuts a chunked body that grows past it (the route's body read then raises,
    answered by the APIError handler)."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_header_bytes: int = 32 * 1024) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
        if header_bytes > self.max_header_bytes:
            error = HeadersTooLargeError(
                f"Request headers total {header_bytes} bytes; the limit is "
                f"{self.max_header_bytes}.",
                code="headers_too_large",
            )
            await JSONResponse(error.to_dict(), status_code=431)(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            response = JSONResponse(self._error().to_dict(), status_code=413)
            await response(scope, receive, send)
            return
        num_received = 0

        async def limited_receive() -> Message:
            nonlocal num_received
            message = await receive()
            num_received += len(message.get("body", b""))
            if num_received > self.max_bytes:
                raise self._error()
            return message

        await self.app(scope, limited_receive, send)

    def _error(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"Request body is larger than the limit of {self.max_bytes} bytes.",
            code="request_too_large",
        )
