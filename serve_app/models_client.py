"""`serve-app models ls | add | rm | load | unload`: the /admin/models routes of a running
service, from the terminal. The key is $SERVE_APP_ADMIN_API_KEY, else $SERVE_APP_API_KEY."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import httpx
import yaml

from serve_app.client import auth_headers

# Long enough for a model's first start (add, load); the route's own ?timeout_s= is shorter.
CLIENT_TIMEOUT_S = 660.0


def models_command(url: str, action: str, args: Any, out: TextIO = sys.stdout) -> int:
    """Runs one action; exit code 0 when the service answered 2xx."""
    headers = auth_headers(is_admin=True)
    with httpx.Client(base_url=url, headers=headers, timeout=CLIENT_TIMEOUT_S) as client:
        if action == "ls":
            return _list(client, out)
        if action == "add":
            return _answer(client.post("/admin/models", json=_model_entry(args)), out)
        if action == "rm":
            return _answer(client.delete(f"/admin/models/{args.model_id}"), out)
        return _answer(client.post(f"/admin/models/{args.model_id}/{action}"), out)


def _list(client: httpx.Client, out: TextIO) -> int:
    response = client.get("/admin/models")
    if response.status_code != 200:
        return _answer(response, out)
    out.write(f"{'model':28} {'kind':11} {'status':9} {'idle_timeout_s':>14}  source\n")
    for model in response.json()["data"]:
        status = model["status"] + (" (unloaded)" if model.get("unloaded") else "")
        idle = model.get("idle_timeout_s") or "-"
        out.write(
            f"{model['id']:28} {model.get('kind', '-'):11} {status:9} {idle:>14}  "
            f"{model.get('source', '-')}\n"
        )
        if model.get("error"):
            out.write(f"  error: {model['error']}\n")
    return 0


def _model_entry(args: Any) -> dict[str, Any]:
    """From --file (a model entry as in config/serve.yaml: YAML or JSON) and the flags."""
    entry: dict[str, Any] = {}
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            entry = yaml.safe_load(f) or {}
    flags = {
        "id": args.model_id,
        "kind": args.kind,
        "source": args.source,
        "idle_timeout_s": args.idle_timeout_s,
        "engine": json.loads(args.engine) if args.engine else None,
        "deployment": json.loads(args.deployment) if args.deployment else None,
    }
    entry.update({k: v for k, v in flags.items() if v is not None})
    return entry


def _answer(response: httpx.Response, out: TextIO) -> int:
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text}}
    if response.status_code >= 400:
        out.write(f"error {response.status_code}: {body.get('error', {}).get('message', body)}\n")
        return 1
    out.write(json.dumps(body) + "\n")
    return 0
