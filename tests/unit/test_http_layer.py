"""The ingress's HTTP pieces on a bare FastAPI app: error mapping, body limit, API keys."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from deployments.auth import ApiKeys, BearerAuth, load_access_keys, load_api_keys
from deployments.body_limit import BodySizeLimit
from deployments.http_errors import install_error_handlers, upstream_error
from serve_app.protocol import ChatCompletionRequest


@pytest.fixture()
def client(monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("SERVE_APP_API_KEYS", "env-key, other-key")
    keys = load_api_keys(["config-key"])
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=2000)
    app.add_middleware(BearerAuth, api_keys=lambda: keys)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict:
        return {"model": body.model}

    @app.get("/v1/busy")
    async def busy() -> dict:
        try:
            raise BackPressureError(num_queued_requests=1, max_queued_requests=1)
        except Exception as exc:
            raise upstream_error("m", exc) from exc

    return TestClient(app)


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def error(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("key", ["config-key", "env-key", "other-key"])
def test_any_configured_key_is_accepted(client: TestClient, key: str) -> None:
    response = client.post(
        "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong", "Basic config-key", "Bearer ", "config-key"]
)
def test_missing_or_wrong_key_is_401(client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = client.post("/v1/chat/completions", json=BODY, headers=headers)
    assert error(response, 401)["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"


def test_no_keys_means_auth_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVE_APP_API_KEYS", raising=False)
    assert load_api_keys([]) == ApiKeys()
    assert not load_api_keys([]).is_required


def test_declared_and_streamed_oversized_bodies_are_413(client: TestClient) -> None:
    huge = {**BODY, "messages": [{"role": "user", "content": "x" * 5000}]}
    auth = {"Authorization": "Bearer env-key"}
    assert (
        error(client.post("/v1/chat/completions", json=huge, headers=auth), 413)["code"]
        == "request_too_large"
    )

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}]}'

    response = client.post(
        "/v1/chat/completions",
        content=chunks(),
        headers={**auth, "content-type": "application/json"},
    )
    assert error(response, 413)["code"] == "request_too_large"


def test_validation_errors_are_400_naming_the_parameter(client: TestClient) -> None:
    auth = {"Authorization": "Bearer env-key"}
    response = client.post(
        "/v1/chat/completions", json={**BODY, "temperature": "hot"}, headers=auth
    )
    assert error(response, 400)["param"] == "temperature"
    response = client.post(
        "/v1/chat/completions",
        content=b"{not json",
        headers={**auth, "content-type": "application/json"},
    )
    assert error(response, 400)["code"] == "invalid_json"
    deep = "[" * 5000 + "]" * 5000
    response = client.post(
        "/v1/chat/completions",
        content=deep.encode()[:1990],
        headers={**auth, "content-type": "application/json"},
    )
    assert response.status_code == 400


def test_backpressure_is_429_with_retry_after(client: TestClient) -> None:
    response = client.get("/v1/busy", headers={"Authorization": "Bearer env-key"})
    assert error(response, 429)["type"] == "rate_limit_error"
    assert response.headers["retry-after"]


def test_oversized_headers_are_431(client: TestClient) -> None:
    headers = {"Authorization": "Bearer env-key", "X-Big": "a" * 40_000}
    response = client.post("/v1/chat/completions", json=BODY, headers=headers)
    assert error(response, 431)["code"] == "headers_too_large"


def test_unknown_model_error_does_not_echo_a_huge_name() -> None:
    from serve_app.errors import ModelNotFoundError

    error = ModelNotFoundError("x" * 100_000).to_dict()["error"]
    assert len(error["message"]) < 300 and error["code"] == "model_not_found"


@pytest.mark.parametrize("api_keys", [["user-key"], []])
def test_admin_keys_alone_open_admin(monkeypatch: pytest.MonkeyPatch, api_keys: list[str]) -> None:
    """With admin keys configured, /admin takes only them (an API key there is 403); the API
    keeps its own keys (or none)."""
    monkeypatch.delenv("SERVE_APP_API_KEYS", raising=False)
    monkeypatch.setenv("SERVE_APP_ADMIN_API_KEYS", "env-admin")
    access = load_access_keys(api_keys, ["admin-key"])
    app = FastAPI()
    app.add_middleware(BearerAuth, api_keys=lambda: access)

    @app.get("/admin/models")
    async def admin() -> dict:
        return {}

    @app.get("/v1/models")
    async def models() -> dict:
        return {}

    client = TestClient(app)
    client.__enter__()  # runs the lifespan scope through the middleware too (it has no path)

    def get(path: str, key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return client.get(path, headers=headers).status_code

    assert get("/admin/models", "admin-key") == 200 and get("/admin/models", "env-admin") == 200
    assert get("/admin/models", None) == 401
    if api_keys:
        assert get("/admin/models", "user-key") == 403
        assert get("/v1/models", "user-key") == 200 and get("/v1/models", "admin-key") == 401
    else:
        assert get("/v1/models", None) == 200  # the API stays open
    client.__exit__(None, None, None)


def test_without_admin_keys_admin_takes_the_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVE_APP_ADMIN_API_KEYS", raising=False)
    access = load_access_keys(["user-key"], [])
    assert access.admin is None
    assert access.for_path("/admin/models") is access.api
