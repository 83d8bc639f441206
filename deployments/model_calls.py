"""How the ingress reaches its model replicas: streamed generations (answered as JSON, as
OpenAI's SSE, or as another API's events) and plain method calls. Holds one DeploymentHandle
per model; a replica's Rejected becomes the HTTP error it names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.http_errors import upstream_error
from deployments.streaming import cancel, chat_chunks, collect, sse_events, translated_events
from serve_app.anthropic_stream import MessagesStream
from serve_app.config import ModelRoute
from serve_app.openai_adapter import Admitted, GenerateCall, Rejected, chat_call, new_request_id
from serve_app.protocol import ChatCompletionRequest
from serve_app.response_builder import ResponseBuilder, ResponseIds
from serve_app.responses_stream import ResponsesStream

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


class ModelCalls:
    def __init__(self, model_ids: list[str], timeout_s: float | None) -> None:
        # Each model is a Serve application of its own, found by its id.
        self.handles: dict[str, DeploymentHandle] = {
            model_id: DeploymentHandle(model_id, model_id) for model_id in model_ids
        }
        self.timeout_s = timeout_s

    def route_to(self, model_ids: list[str]) -> None:
        """A new routing table: handles kept for the models that stay, new ones for the rest."""
        self.handles = {
            model_id: self.handles.get(model_id) or DeploymentHandle(model_id, model_id)
            for model_id in model_ids
        }

    async def generate(
        self, model: ModelRoute, call: GenerateCall, is_stream: bool, include_usage: bool
    ) -> Response:
        stream, builder = await self.start(model, call)
        headers = {"X-Request-Id": call.request_id}
        if not is_stream:
            body = await collect(stream, builder, self.timeout_s)
            return JSONResponse(body, headers=headers)
        events = sse_events(chat_chunks(stream, builder, include_usage, self.timeout_s))
        return StreamingResponse(
            events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
        )

    async def translated(
        self,
        model: ModelRoute,
        body: ChatCompletionRequest,
        to_body: Callable[[dict[str, Any]], dict[str, Any]],
        translator: ResponsesStream | MessagesStream,
    ) -> Response:
        """A chat generation answered in another API's shape (its body or its SSE events)."""
        call = chat_call(body, new_request_id())
        stream, builder = await self.start(model, call)
        headers = {"X-Request-Id": call.request_id}
        if not body.stream:
            completion = await collect(stream, builder, self.timeout_s)
            return JSONResponse(to_body(completion), headers=headers)
        chunks = chat_chunks(stream, builder, True, self.timeout_s)
        return StreamingResponse(
            translated_events(chunks, translator),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **headers},
        )

    async def start(
        self, model: ModelRoute, call: GenerateCall
    ) -> tuple[DeploymentResponseGenerator, ResponseBuilder]:
        """Sends the call; returns its stream once the replica admitted it (errors raised)."""
        handle = self.handles[model.id].options(stream=True)
        stream: DeploymentResponseGenerator | None = None
        try:
            # Routing errors (backpressure, no live replica) surface in remote() or the first item.
            stream = cast(DeploymentResponseGenerator, handle.generate.remote(call))
            first = await stream.__anext__()
        except Exception as exc:
            cancel(stream)
            raise upstream_error(model.id, exc) from exc
        except BaseException:  # cancelled while waiting: do not leave the call queued
            cancel(stream)
            raise
        if isinstance(first, Rejected):
            raise first.to_error()
        assert isinstance(first, Admitted) and stream is not None
        builder = ResponseBuilder(
            ResponseIds(call.request_id, model.id, call.endpoint),
            first.num_prompt_tokens,
            call.num_choices,
            has_tools=call.constraint_param == "tools",
            echo_text=first.echo_text,
            has_logprobs=call.sampling.logprobs is not None,
        )
        return stream, builder

    async def call(self, model_id: str, method: str, *args: Any) -> Any:
        """A plain (not streamed) call of a model replica's method; its Rejected is raised."""
        try:
            result = await getattr(self.handles[model_id], method).remote(*args)
        except Exception as exc:
            raise upstream_error(model_id, exc) from exc
        if isinstance(result, Rejected):
            raise result.to_error()
        return result

    def call_info(self, model_id: str) -> Any:
        """The replica's `info` (load error, context length): a plain, unawaited call. Also for
        a model just added by this replica, which its routing table does not hold yet."""
        handle = self.handles.get(model_id) or DeploymentHandle(model_id, model_id)
        return handle.info.remote()
