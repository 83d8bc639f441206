"""The ingress's side of one generation: the replica's stream -> a body, chat chunks, or SSE.

A `ResponseBuilder` (serve_app/response_builder.py) shapes each delta; these functions own the
deadline, the error event after a 200, and cancelling the replica's call when the client goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentResponseGenerator

from deployments.http_errors import upstream_error
from deployments.metrics import record_error
from serve_app.anthropic_stream import MessagesStream
from serve_app.engine.types import RequestOutput
from serve_app.errors import APIError, GenerationTimeoutError, error_body
from serve_app.openai_adapter import ChoiceOutput
from serve_app.response_builder import ResponseBuilder
from serve_app.responses_stream import ResponsesStream

logger = logging.getLogger(__name__)


def _choice_output(item: RequestOutput | ChoiceOutput) -> tuple[int, RequestOutput]:
    return (item.index, item.output) if isinstance(item, ChoiceOutput) else (0, item)


async def collect(
    stream: DeploymentResponseGenerator, builder: ResponseBuilder, timeout_s: float | None
) -> Any:
    model = builder.ids.model
    try:
        async with asyncio.timeout(timeout_s):
            async for item in stream:
                builder.add(*_choice_output(item))
    except TimeoutError as exc:
        raise GenerationTimeoutError(_timeout_message(timeout_s)) from exc
    except Exception as exc:
        raise upstream_error(model, exc) from exc
    finally:
        cancel(stream)  # no-op when finished; frees the slot on timeout or cancellation
    failure = builder.failure or (None if builder.is_finished else "generation ended early")
    if failure:
        raise APIError(failure, code="generation_failed")  # 500 server_error, engine's reason
    return builder.response()


async def chat_chunks(
    stream: DeploymentResponseGenerator,
    builder: ResponseBuilder,
    include_usage: bool,
    timeout_s: float | None,
) -> AsyncIterator[dict[str, Any]]:
    """Engine deltas -> chat chunk dicts; a failure after the 200 ends it with an error dict."""
    model = builder.ids.model
    try:
        for first in builder.first_chunks():
            yield first
        async with asyncio.timeout(timeout_s):
            async for item in stream:
                chunk = builder.add(*_choice_output(item))
                if builder.failure:
                    break
                if chunk is not None:
                    yield chunk
        if builder.is_finished and not builder.failure:
            if include_usage:
                yield builder.usage_chunk()
        else:
            message = builder.failure or "the stream ended before generation finished"
            record_error(model, 500)  # after the 200: counted here, not by a handler
            yield error_body(message, "server_error")
    except TimeoutError:
        timeout = GenerationTimeoutError(_timeout_message(timeout_s))
        record_error(model, timeout.status_code)
        yield timeout.to_dict()
    except asyncio.CancelledError:
        raise  # client went away; the finally below frees the engine slot
    except Exception as exc:  # the replica died or was replaced mid-stream
        logger.warning("stream %s failed: %r", builder.ids.request_id, exc)
        error = upstream_error(model, exc)
        record_error(model, error.status_code)
        yield error.to_dict()
    finally:
        cancel(stream)


async def sse_events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Chat chunks as OpenAI's SSE: one `data:` line each, then [DONE], error or not."""
    async for chunk in chunks:
        yield sse_line(chunk)
    yield "data: [DONE]\n\n"


async def translated_events(
    chunks: AsyncIterator[dict[str, Any]], translator: ResponsesStream | MessagesStream
) -> AsyncIterator[str]:
    """Chat chunks re-told as another API's SSE events (Responses, Anthropic Messages)."""
    async for chunk in chunks:
        for event in translator.feed(chunk):
            yield event
    for event in translator.close():
        yield event


def cancel(stream: DeploymentResponseGenerator | None) -> None:
    # cancel() of a call that routing already refused re-raises that refusal; it is moot.
    with contextlib.suppress(Exception):
        if stream is not None:
            stream.cancel()


def _timeout_message(timeout_s: float | None) -> str:
    return f"generation exceeded the request deadline of {timeout_s} s"


def sse_line(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
