"""The real ingress app (deployments.ingress.app) driven in-process: Serve's replica context and
the model handles are faked, so auth order, unknown paths, the admin routes' loop use, health
probes and the streamed-error metrics are checked without Ray."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import ray
from fastapi.testclient import TestClient
from ray import serve

import deployments.ingress as ingress_module
import deployments.streaming as streaming
from deployments.ingress import Ingress, app
from serve_app.engine.types import RequestOutput
from serve_app.openai_adapter import Admitted

MODEL = "chat-m"
KEY = "sk-unit"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class FakeStream:
    """Stands in for a DeploymentResponseGenerator: yields `items`, then ends or hangs."""

    def __init__(self, items: list[Any], hang: bool) -> None:
        self.items, self.hang, self.is_cancelled = list(items), hang, False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        if self.items:
            return self.items.pop(0)
        if self.hang:
            await asyncio.Event().wait()
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.is_cancelled = True


class FakeHandle:
    """A model's DeploymentHandle: `info` answers `info_answer` (or never, when None)."""

    def __init__(self, info_answer: dict[str, Any] | None, outputs: list[Any], hang: bool) -> None:
        self.info_answer, self.outputs, self.hang = info_answer, outputs, hang
        self.num_info_calls = 0
        self.info = SimpleNamespace(remote=self._info)
        self.generate = SimpleNamespace(remote=lambda call: FakeStream(self.outputs, self.hang))

    def options(self, **_: Any) -> FakeHandle:
        return self

    async def _info(self) -> dict[str, Any] | None:
        self.num_info_calls += 1
        if self.info_answer is None:  # queued behind generation: never answers in time
            await asyncio.Event().wait()
        return self.info_answer


def ready_info(model_id: str = MODEL) -> dict[str, Any]:
    return {"id": model_id, "ready": True, "context_length": 2048, "error": None}


def serve_status(num_running: int = 1, num_starting: int = 0) -> SimpleNamespace:
    states = {"RUNNING": num_running, "STARTING": num_starting}
    deployment = SimpleNamespace(
        status="HEALTHY", replica_states={k: n for k, n in states.items() if n}, message=""
    )
    application = SimpleNamespace(
        status="RUNNING", last_deployed_time_s=1.0, deployments={MODEL: deployment}
    )
    return SimpleNamespace(applications={MODEL: application})


@pytest.fixture()
def make_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., TestClient]]:
    """Builds an Ingress over fake handles and makes it the replica's servable object."""
    monkeypatch.delenv("SERVE_APP_API_KEYS", raising=False)
    status_calls: list[float] = []

    def fake_status() -> SimpleNamespace:
        status_calls.append(time.monotonic())
        return serve_status()

    monkeypatch.setattr(serve, "status", fake_status)

    def make(
        api_keys: list[str] | None = None,
        info: dict[str, Any] | None = ready_info(),  # noqa: B008
        outputs: list[Any] | None = None,
        hang: bool = False,
        timeout_s: float = 5.0,
    ) -> TestClient:
        handle = FakeHandle(info, outputs or [], hang)
        config = {
            "models": [{"id": MODEL, "kind": "chat"}],
            "ingress": {
                "api_keys": [KEY] if api_keys is None else api_keys,
                "request_timeout_s": timeout_s,
            },
        }
        ingress = Ingress(config)
        ingress.calls.handles = {MODEL: handle}  # type: ignore[dict-item]
        context = SimpleNamespace(servable_object=ingress)
        monkeypatch.setattr(serve, "get_replica_context", lambda: context)
        client = TestClient(app, raise_server_exceptions=False)
        client.handle = handle  # type: ignore[attr-defined]
        client.status_calls = status_calls  # type: ignore[attr-defined]
        return client

    yield make


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---- auth comes before the body is read -------------------------------------------------


def test_unauthenticated_invalid_body_is_401_not_400(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    response = client.post("/v1/chat/completions", json={"model": 1, "temperature": "hot"})
    assert error_of(response, 401)["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert "temperature" not in response.text


def test_unauthenticated_huge_body_is_401_not_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    huge = b"x" * (ingress_module.MAX_BODY_BYTES + 1)
    response = client.post(
        "/v1/chat/completions", content=huge, headers={"content-type": "application/json"}
    )
    assert error_of(response, 401)["code"] == "invalid_api_key"


@pytest.mark.parametrize("keys", [[""], ["  "], ["", KEY]])
def test_blank_key_never_authenticates(
    make_client: Callable[..., TestClient], keys: list[str]
) -> None:
    client = make_client(api_keys=keys)
    for header in ("Bearer ", "Bearer", "Bearer   "):
        response = client.get("/v1/models", headers={"Authorization": header})
        assert error_of(response, 401)["code"] == "invalid_api_key"


def test_blank_env_key_never_authenticates(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_APP_API_KEYS", " , ")
    client = make_client(api_keys=[KEY])
    assert error_of(client.get("/v1/models", headers={"Authorization": "Bearer "}), 401)
    assert client.get("/v1/models", headers=AUTH).status_code == 200


def test_every_api_route_needs_the_key(make_client: Callable[..., TestClient]) -> None:
    """A route added later is covered too: each route of the app but /health, the page and the
    docs answers 401 without a key, whatever its method and body."""
    client = make_client()
    public = {"/health", "/{path:path}", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
    routes = [r for r in _routes(app.routes) if r.path not in public]
    assert routes
    for route in routes:
        path = route.path.replace("{model_id}", MODEL)
        for method in route.methods:
            response = client.request(method, path, content=b"{")
            assert response.status_code == 401, (method, path, response.text)
    assert client.get("/health").status_code == 200
    assert client.get("/").status_code == 200  # the chat page


def _routes(routes: list[Any]) -> list[Any]:
    # FastAPI >= 0.137 nests included routers (Serve re-includes the class's routes that way).
    found: list[Any] = []
    for route in routes:
        nested = getattr(route, "original_router", None)
        found.extend(_routes(nested.routes) if nested is not None else [route])
    return found


def test_valid_key_reaches_the_route(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    response = client.post("/v1/chat/completions", json={"model": 1}, headers=AUTH)
    assert error_of(response, 400)["param"] == "model"


# ---- unknown paths ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/%00", "/a%00b.html", "/v1/%00"])
def test_nul_in_path_is_404(make_client: Callable[..., TestClient], path: str) -> None:
    response = make_client().get(path, headers=AUTH)
    assert error_of(response, 404)["code"] == "not_found"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_unknown_api_route_is_404_not_405(
    make_client: Callable[..., TestClient], method: str
) -> None:
    client = make_client()
    response = client.request(method, "/v1/assistants", json={"model": MODEL}, headers=AUTH)
    assert error_of(response, 404)["type"] == "invalid_request_error"
    assert error_of(client.post("/nope", json={}, headers=AUTH), 404)


# ---- admin routes stay off the event loop ------------------------------------------------


async def _max_loop_gap(request: Callable[[], Any], duration_s: float) -> tuple[float, Any]:
    gaps: list[float] = []
    is_done = False

    async def ticker() -> None:
        last = time.monotonic()
        while not is_done:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    response = await request()
    is_done = True
    await tick
    return max(gaps), response


@pytest.mark.parametrize("path", ["/admin/status", "/admin/metrics-targets"])
async def test_admin_routes_do_not_block_the_loop(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    make_client()
    blocking_s = 0.5

    def slow_status() -> SimpleNamespace:
        time.sleep(blocking_s)
        return serve_status()

    def slow_nodes() -> list[dict[str, Any]]:
        time.sleep(blocking_s)
        return [{"Alive": True, "NodeManagerAddress": "10.0.0.1", "MetricsExportPort": 8080}]

    monkeypatch.setattr(serve, "status", slow_status)
    monkeypatch.setattr(ray, "nodes", slow_nodes)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        gap, response = await _max_loop_gap(lambda: client.get(path, headers=AUTH), blocking_s)
    assert response.status_code == 200, response.text
    assert gap < blocking_s / 2, f"the event loop stalled {gap:.2f} s"


# ---- health and model cards without queueing behind generation ---------------------------


def test_health_is_prompt_while_the_model_is_busy(make_client: Callable[..., TestClient]) -> None:
    client = make_client(info=None)  # info queued behind generation: never answers
    started = time.monotonic()
    response = client.get("/health")
    assert response.status_code == 200, response.text
    models = client.get("/v1/models", headers=AUTH).json()["data"]
    assert [m["status"] for m in models] == ["ready"]
    assert time.monotonic() - started < 1.5


def test_health_probes_neither_the_controller_nor_the_replica_each_time(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    for _ in range(5):
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert client.handle.num_info_calls <= 1  # type: ignore[attr-defined]
    assert len(client.status_calls) == 1  # type: ignore[attr-defined]
    card = client.get(f"/v1/models/{MODEL}", headers=AUTH).json()
    assert card["status"] == "ready" and card["context_length"] == 2048


def test_model_whose_weights_failed_reads_not_ready(make_client: Callable[..., TestClient]) -> None:
    broken = {"id": MODEL, "ready": False, "context_length": None, "error": "no such file"}
    client = make_client(info=broken)
    response = client.get("/health")
    assert response.status_code == 503 and response.json()["not_ready"] == [MODEL]
    models = client.get("/v1/models", headers=AUTH).json()["data"]
    assert [m["status"] for m in models] == ["failed"]


def test_a_model_starting_its_replica_reads_loading(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    monkeypatch.setattr(serve, "status", lambda: serve_status(num_running=0, num_starting=1))
    response = client.get("/health")
    assert response.status_code == 503 and response.json()["not_ready"] == [MODEL]
    assert response.json()["models"] == {MODEL: "loading"}


def test_a_model_scaled_to_zero_is_idle_healthy_and_never_woken(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()
    monkeypatch.setattr(serve, "status", lambda: serve_status(num_running=0))
    response = client.get("/health")
    assert response.status_code == 200 and response.json()["models"] == {MODEL: "idle"}
    card = client.get(f"/v1/models/{MODEL}", headers=AUTH).json()
    assert card["status"] == "idle"
    assert client.handle.num_info_calls == 0  # type: ignore[attr-defined]


# ---- streamed failures are counted -------------------------------------------------------


@pytest.fixture()
def recorded_errors(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    errors: list[tuple[str, int]] = []
    monkeypatch.setattr(streaming, "record_error", lambda m, s: errors.append((m, s)))
    return errors


def output(text: str, reason: str | None = None, error: str | None = None) -> RequestOutput:
    # cast: the engine's finish reasons may be an enum of these strings
    return RequestOutput("r", text, 3, 1, finish_reason=cast(Any, reason), error=error)


def _stream(client: TestClient) -> list[str]:
    body = {**CHAT, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line.startswith("data: ")]


def test_engine_error_after_the_200_is_counted(
    make_client: Callable[..., TestClient], recorded_errors: list[tuple[str, int]]
) -> None:
    outputs = [
        Admitted(3),
        output("a"),
        output("", "error", error="engine step failed"),
    ]
    events = _stream(make_client(outputs=outputs))
    assert "engine step failed" in events[-2] and events[-1] == "data: [DONE]"
    assert recorded_errors == [(MODEL, 500)]


def test_deadline_after_the_200_is_counted(
    make_client: Callable[..., TestClient], recorded_errors: list[tuple[str, int]]
) -> None:
    events = _stream(make_client(outputs=[Admitted(3)], hang=True, timeout_s=0.2))
    assert "deadline" in events[-2]
    assert recorded_errors == [(MODEL, 504)]


def test_finished_stream_counts_no_error(
    make_client: Callable[..., TestClient], recorded_errors: list[tuple[str, int]]
) -> None:
    outputs = [Admitted(3), output("a", "stop")]
    _stream(make_client(outputs=outputs))
    assert recorded_errors == []


def test_a_new_routing_table_applies_in_place(make_client: Callable[..., TestClient]) -> None:
    """Ingress.reconfigure (Serve's user_config): /admin/models' table, without a restart."""
    client = make_client()
    ingress = serve.get_replica_context().servable_object
    ingress.reconfigure(
        {"models": [{"id": MODEL, "kind": "chat"}, {"id": "new-m", "kind": "chat"}]}
    )
    ids = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert ids == [MODEL, "new-m"] and set(ingress.calls.handles) == {MODEL, "new-m"}
    assert ingress.calls.handles[MODEL] is client.handle  # kept, not rebuilt
    ingress.reconfigure({"models": [{"id": "new-m", "kind": "chat"}]})
    assert error_of(client.post("/v1/chat/completions", json=CHAT, headers=AUTH), 404)
    ingress.reconfigure({})  # no table: the current one stays
    assert [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]] == ["new-m"]
