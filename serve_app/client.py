"""Terminal clients of a running service for the CLI: status and a streaming chat."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import httpx

from serve_app.sse import DONE, iter_data

DEFAULT_URL = "http://127.0.0.1:8000"


def auth_headers(is_admin: bool = False) -> dict[str, str]:
    """$SERVE_APP_API_KEY; for /admin, $SERVE_APP_ADMIN_API_KEY first (when admin keys are
    configured, only they open /admin)."""
    admin_key = os.environ.get("SERVE_APP_ADMIN_API_KEY") if is_admin else None
    key = admin_key or os.environ.get("SERVE_APP_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def print_status(url: str, out: TextIO = sys.stdout) -> int:
    """Models (kind, status, load) and replicas; exit code 0 only when /health is 200."""
    with httpx.Client(base_url=url, headers=auth_headers(), timeout=10) as client:
        health = client.get("/health")
        models = client.get("/v1/models").json()["data"]
        admin = auth_headers(is_admin=True)
        status = client.get("/admin/status", headers=admin).json()["applications"]
        out.write(f"health: {health.status_code} {health.json().get('status')}\n")
        out.write(
            f"{'model':28} {'kind':11} {'status':12} {'context':>8} {'running':>8} {'waiting':>8}\n"
        )
        for model in models:
            load = _load(client, model)
            out.write(
                f"{model['id']:28} {model['kind']:11} {model['status']:12} "
                f"{model.get('context_length') or '-':>8} {load[0]:>8} {load[1]:>8}\n"
            )
        for app_name, app_status in status.items():
            out.write(f"application {app_name}: {app_status['status']}\n")
            for name, info in app_status["deployments"].items():
                replicas = ", ".join(f"{n} {state}" for state, n in info["replicas"].items())
                out.write(f"  {name:28} {info['status']:10} {replicas}\n")
    return 0 if health.status_code == 200 else 1


def _load(client: httpx.Client, model: dict[str, Any]) -> tuple[Any, Any]:
    if model["kind"] == "embedding" or model["status"] != "ready":
        return "-", "-"
    admin = auth_headers(is_admin=True)
    stats = client.get(f"/admin/models/{model['id']}/stats", headers=admin).json()
    return stats.get("num_running", "-"), stats.get("num_waiting", "-")


def stream_chat(
    url: str, model: str, messages: list[dict[str, str]], settings: dict[str, Any]
) -> Iterator[str]:
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    body.update({k: v for k, v in settings.items() if v is not None})
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=auth_headers(), timeout=600
    ) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(response.json()["error"]["message"])
        for data in iter_data(response.iter_lines()):
            if data == DONE:
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"]:
                yield chunk["choices"][0]["delta"].get("content") or ""


def chat_loop(url: str, model: str, system: str | None, settings: dict[str, Any]) -> int:
    """Reads a line, streams the reply token by token; history kept until EOF or /exit."""
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = []
        try:
            for delta in stream_chat(url, model, messages, settings):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except (RuntimeError, httpx.HTTPError) as exc:
            sys.stdout.write(f"\n[error] {exc}\n")
            messages.pop()
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
