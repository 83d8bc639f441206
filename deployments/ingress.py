"""The HTTP front door (FastAPI on Ray Serve): validates, routes by `model`, streams SSE.

It holds one DeploymentHandle per model (each model is a Serve application of its own, found
by name) and imports no torch, so it starts fast.
"""

import asyncio
import base64
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve

from deployments.admin import metrics_export_targets, serve_status_summary
from deployments.auth import AccessKeys, BearerAuth, load_access_keys
from deployments.body_limit import BodySizeLimit
from deployments.http_errors import install_error_handlers, upstream_error
from deployments.model_calls import ModelCalls
from deployments.model_manager import ModelManager
from deployments.readiness import ModelReadiness, ModelStatus
from deployments.static import not_found, static_file
from serve_app.anthropic_api import (
    MessagesRequest,
    chat_body_from_messages,
    message_from_chat,
    new_message_id,
)
from serve_app.anthropic_stream import MessagesStream
from serve_app.config import INGRESS_DEPLOYMENT, IngressAppConfig, ModelConfig, ModelRoute
from serve_app.errors import (
    APIError,
    ConflictError,
    InvalidRequestError,
    ModelNotFoundError,
)
from serve_app.openai_adapter import (
    chat_call,
    completion_call,
    new_request_id,
    tokenize_call,
)
from serve_app.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    TokenizeRequest,
)
from serve_app.rerank_api import (
    RerankRequest,
    ScoreRequest,
    rename_input_error,
    rerank_body,
    score_body,
)
from serve_app.response_builder import usage
from serve_app.response_types import ChatCompletionResponse, CompletionResponse
from serve_app.responses_api import (
    ResponsesRequest,
    chat_body_from_responses,
    new_response_id,
    response_from_chat,
)
from serve_app.responses_stream import ResponsesStream

logger = logging.getLogger(__name__)

FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"

MAX_BODY_BYTES = int(os.environ.get("SERVE_APP_MAX_BODY_BYTES", 4 * 1024 * 1024))
MAX_HEADER_BYTES = int(os.environ.get("SERVE_APP_MAX_HEADER_BYTES", 32 * 1024))
CORS_ORIGINS = [o for o in os.environ.get("SERVE_APP_CORS_ORIGINS", "").split(",") if o]


def replica_api_keys() -> AccessKeys:
    """The keys of the Ingress this replica runs (Serve binds routes' `self` the same way)."""
    ingress = cast("Ingress", serve.get_replica_context().servable_object)
    return ingress.api_keys


app = FastAPI(
    title="serve-app",
    version="0.1.0",
    docs_url="/docs",
    redoc_url=None,
)
install_error_handlers(app)
app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES, max_header_bytes=MAX_HEADER_BYTES)
# Added after (so outside) the body limit: an unauthenticated request gets its 401 before its
# size or body is looked at.
app.add_middleware(BearerAuth, api_keys=replica_api_keys)
if CORS_ORIGINS:  # off by default: the chat page is same-origin
    app.add_middleware(
        CORSMiddleware,
        allow_origins=CORS_ORIGINS,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["X-Request-Id"],
    )


def _check_embedding_options(body: EmbeddingRequest) -> None:
    if body.dimensions is not None:
        raise InvalidRequestError("dimensions is not supported by this model", param="dimensions")


def _chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """The chat request another API's body translates to; what it cannot express is a 400."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    # "base64" is little-endian float32, what the openai SDK asks for by default.
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


_ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
SERVING = frozenset({"ready", "idle"})  # /health is 200 when every model is one of these
# How long an admin change waits for the model to get where it was sent (?timeout_s=).
ADMIN_TIMEOUT_S = Query(300.0, gt=0, le=3600)


# serve.ingress pickles the app and the route functions' globals when the class is
# decorated, so every helper must be defined above the class.


class Ingress:
    def __init__(self, app_config: dict[str, Any]):
        """`app_config`: IngressAppConfig's fields (the routing table and ingress options)."""
        self.config = IngressAppConfig.model_validate(app_config)
        self.calls = ModelCalls(
            [m.id for m in self.config.models], self.config.ingress.request_timeout_s
        )
        self.started_at = int(time.time())
        self.readiness = ModelReadiness(lambda model_id: self.calls.call_info(model_id))
        self.models = ModelManager(
            self.readiness, self._wake, self.config.ingress.config_file, self._model_ids
        )
        self.api_keys = load_access_keys(  # read by BearerAuth
            self.config.ingress.api_keys, self.config.ingress.admin_api_keys
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's in-place update (no restart): a routing table newer than the args' one,
        written by /admin/models (serve_app/live_config.py)."""
        routes = user_config.get("models")
        if routes is None:
            return
        fields = {**self.config.model_dump(mode="json"), "models": routes}
        self.config = IngressAppConfig.model_validate(fields)
        self.calls.route_to(self._model_ids())
        logger.info("routing table now %s", self._model_ids())

    # ---- routes ------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> Response:
        """Serve's view of each model plus its cached load result (deployments/readiness.py):
        no call that waits behind generation or wakes an idle model. 200 when every model is
        ready or idle (an idle one wakes on its next request)."""
        statuses = await self.readiness.statuses(self._model_ids())
        not_ready = [model_id for model_id, status in statuses.items() if status not in SERVING]
        if not_ready:
            body = {"status": "unavailable", "not_ready": not_ready, "models": statuses}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "models": statuses})

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        statuses = await self.readiness.statuses(self._model_ids())
        cards = [self._card(m, statuses[m.id]).model_dump() for m in self.config.models]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id}")
    async def get_model(self, model_id: str) -> dict[str, Any]:
        model = self._model(model_id)
        statuses = await self.readiness.statuses([model_id])
        return self._card(model, statuses[model_id]).model_dump()

    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}})
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        model = self._chat_model(body.model, request)
        call = chat_call(body, new_request_id())
        return await self.calls.generate(model, call, body.stream, body.include_usage)

    @app.post("/v1/responses")
    async def responses(self, body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API (stateless), answered through the chat path."""
        model = self._chat_model(body.model, request)
        chat = _chat_request(chat_body_from_responses(body))
        response_id = new_response_id()

        def to_body(completion: dict[str, Any]) -> dict[str, Any]:
            return response_from_chat(completion, body, response_id)

        return await self.calls.translated(model, chat, to_body, ResponsesStream(body, response_id))

    @app.post("/v1/messages")
    async def messages(self, body: MessagesRequest, request: Request) -> Response:
        """Anthropic's Messages API, answered through the chat path."""
        model = self._chat_model(body.model, request)
        chat = _chat_request(chat_body_from_messages(body))
        message_id = new_message_id()

        def to_body(completion: dict[str, Any]) -> dict[str, Any]:
            return message_from_chat(completion, body, message_id)

        return await self.calls.translated(model, chat, to_body, MessagesStream(body, message_id))

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}})
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        model = self._model(body.model)
        request.state.model = model.id  # labels the error metrics (known ids only)
        if "completions" not in model.capabilities:
            raise InvalidRequestError(
                f"Model '{model.id}' is an embedding model; use /v1/embeddings.",
                param="model",
                code="completions_not_supported",
            )
        call = completion_call(body, new_request_id())
        return await self.calls.generate(model, call, body.stream, body.include_usage)

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        model = self._embedding_model(body.model, request)
        _check_embedding_options(body)
        vectors, num_tokens = await self.calls.call(model.id, "embed", body.texts())
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        return {"object": "list", "data": data, "model": model.id, "usage": usage(num_tokens, 0)}

    @app.post("/v1/rerank")
    @app.post("/rerank")
    async def rerank(self, body: RerankRequest, request: Request) -> dict[str, Any]:
        """Cohere/Jina's rerank in vLLM's shape: documents by cosine similarity to the query."""
        return rerank_body(body, *await self._embed_all(body, request))

    @app.post("/v1/score")
    @app.post("/score")
    async def score(self, body: ScoreRequest, request: Request) -> dict[str, Any]:
        """vLLM's score: cosine similarity of text_1/text_2 pairs (1:1, 1:N or N:N)."""
        return score_body(body, *await self._embed_all(body, request))

    @app.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest, request: Request) -> dict[str, Any]:
        """vLLM's /tokenize: the ids a prompt (or chat messages) becomes for this model."""
        model = self._generative_model(body.model, request)
        if body.messages is not None and "chat" not in model.capabilities:
            raise InvalidRequestError(
                f"Model '{model.id}' has no chat template; send a prompt.", param="messages"
            )
        call = tokenize_call(body, new_request_id())
        return await self.calls.call(model.id, "tokenize", call, body.add_special_tokens)

    @app.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        model = self._generative_model(body.model, request)
        return await self.calls.call(model.id, "detokenize", body.tokens)

    @app.get("/admin/models/{model_id}/stats")
    async def model_stats(self, model_id: str) -> dict[str, Any]:
        model = self._model(model_id)
        if model.kind == "embedding":
            raise InvalidRequestError("stats are kept for generative models", param="model_id")
        try:
            result: dict[str, Any] = await self.calls.handles[model_id].stats.remote()
        except Exception as exc:  # replica dead or restarting: 503, not a bare 500
            raise upstream_error(model_id, exc) from exc
        return result

    # ---- model management (deployments/model_manager.py) ------------------------------

    @app.get("/admin/models")
    async def admin_models(self) -> dict[str, Any]:
        """Every model's config entry, status and whether it is unloaded."""
        return {"object": "list", "data": await self.models.describe(self._model_ids())}

    @app.post("/admin/models", status_code=201)
    async def add_model(
        self, body: ModelConfig, timeout_s: float = ADMIN_TIMEOUT_S
    ) -> dict[str, Any]:
        """A new model application and its route (the running ingress takes the new table)."""
        if self.config.model(body.id) is not None:
            message = f"Model '{body.id}' already exists."
            raise ConflictError(message, param="id", code="model_exists")
        return await self.models.add(body, timeout_s)

    @app.delete("/admin/models/{model_id}")
    async def remove_model(
        self, model_id: str, timeout_s: float = Query(60.0, gt=0, le=3600)
    ) -> dict[str, Any]:
        """Its application goes; its replicas finish their open streams first."""
        return await self.models.remove(self._model(model_id).id, timeout_s)

    @app.post("/admin/models/{model_id}/load")
    async def load_model(self, model_id: str, timeout_s: float = ADMIN_TIMEOUT_S) -> dict[str, Any]:
        return await self.models.load(self._model(model_id).id, timeout_s)

    @app.post("/admin/models/{model_id}/unload")
    async def unload_model(
        self, model_id: str, timeout_s: float = Query(60.0, gt=0, le=3600)
    ) -> dict[str, Any]:
        return await self.models.unload(self._model(model_id).id, timeout_s)

    @app.get("/admin/status")
    async def serve_status(self) -> dict[str, Any]:
        """Ray Serve's view: every deployment's status and replicas by state."""
        # A blocking controller call: in a thread, so the streams on this loop keep flowing.
        return {"applications": await asyncio.to_thread(serve_status_summary)}

    @app.get("/admin/metrics-targets")
    async def metrics_targets(self) -> dict[str, Any]:
        """Where Prometheus scrapes: each alive Ray node's metrics export address."""
        return {"targets": await asyncio.to_thread(metrics_export_targets)}

    @app.api_route("/{path:path}", methods=_ANY_METHOD, include_in_schema=False)
    async def frontend(self, path: str, request: Request) -> Response:
        """The static chat page, same origin as the API (declared last: routes above win).
        Every method lands here, so an unknown path is 404 whatever the method, never 405."""
        if request.method not in ("GET", "HEAD"):
            raise not_found(path)
        return static_file(FRONTEND_DIR, path)

    # ---- helpers -----------------------------------------------------------------------

    def _chat_model(self, model_id: str, request: Request) -> ModelRoute:
        model = self._model(model_id)
        request.state.model = model.id  # labels the error metrics (known ids only)
        if "chat" not in model.capabilities:
            raise InvalidRequestError(
                f"Model '{model.id}' is a {model.kind} model and has no chat template; "
                "use /v1/completions for base models or /v1/embeddings for embedding models.",
                param="model",
                code="chat_not_supported",
            )
        return model

    def _generative_model(self, model_id: str, request: Request) -> ModelRoute:
        model = self._model(model_id)
        request.state.model = model.id  # labels the error metrics (known ids only)
        if model.kind == "embedding":
            raise InvalidRequestError(
                f"Model '{model.id}' is an embedding model; it has no tokenizer endpoint here.",
                param="model",
            )
        return model

    def _embedding_model(self, model_id: str, request: Request) -> ModelRoute:
        model = self._model(model_id)
        request.state.model = model.id  # labels the error metrics (known ids only)
        if "embeddings" not in model.capabilities:
            raise InvalidRequestError(
                f"Model '{model.id}' is not an embedding model "
                "(/v1/embeddings, /v1/rerank and /v1/score need one).",
                param="model",
                code="embeddings_not_supported",
            )
        return model

    async def _embed_all(
        self, body: RerankRequest | ScoreRequest, request: Request
    ) -> tuple[list[list[float]], int]:
        """All of a request's texts in one embed call, so the replica batches them together."""
        model = self._embedding_model(body.model, request)
        try:
            return await self.calls.call(model.id, "embed", body.texts())
        except APIError as exc:  # the replica names texts `input[i]`: use this route's names
            raise rename_input_error(exc, body.text_params()) from exc

    def _model_ids(self) -> list[str]:
        return [m.id for m in self.config.models]

    async def _wake(self, model_id: str) -> Any:
        """A call that a replica of the model must answer: Serve starts one if it has none."""
        return await self.calls.call_info(model_id)

    def _model(self, model_id: str) -> ModelRoute:
        model = self.config.model(model_id)
        if model is None:
            raise ModelNotFoundError(model_id)
        return model

    def _card(self, model: ModelRoute, status: ModelStatus) -> ModelCard:
        """From the routing table; context_length once the model's replica has told it."""
        return ModelCard(
            id=model.id,
            created=self.started_at,
            kind=model.kind,
            capabilities=model.capabilities,
            context_length=self.readiness.context_length(model.id),
            status=status,
        )


IngressDeployment = serve.deployment(name=INGRESS_DEPLOYMENT)(serve.ingress(app)(Ingress))
