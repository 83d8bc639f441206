"""Model changes on the running service through Serve's declarative API: the config Serve runs is
read back from its controller, edited (serve_app/live_config.py), applied as `serve deploy` of
the edited file would be, and written to the operator's config file. Every call here blocks on
the controller: the ingress runs them in a thread, one change at a time."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from serve_app.errors import ConflictError

logger = logging.getLogger(__name__)

WRITTEN_HEADER = (
    "# Written by serve-app's model management (/admin/models, `serve-app models`): the\n"
    "# config the service ran after its last change. `serve run` or `serve deploy` of this file\n"
    "# serves the same models.\n"
)


def _client() -> Any:
    # Serve's own controller client, as `serve.status()` uses it inside a replica.
    return serve.context._get_global_client()


def read_running_applications() -> list[dict[str, Any]]:
    """The applications as they were last deployed (each as its config entry was written).
    One Serve still lists as DELETING (a removed model whose replica is stopping) has left the
    config already: it is no sign of an application deployed without one."""
    configs = ray.get(_client()._controller.get_app_configs.remote())
    statuses = serve.status().applications
    missing = sorted(
        name
        for name, application in statuses.items()
        if name not in configs and application.status != ApplicationStatus.DELETING
    )
    if missing:  # deployed with serve.run(): there is no config to edit
        raise ConflictError(
            f"Applications {missing} were not deployed from a config file; model management "
            "needs the service started with `serve run` or `serve deploy` of one.",
            code="not_deployed_from_config",
        )
    return [config.model_dump(exclude_unset=True) for config in configs.values()]


def apply_applications(applications: list[dict[str, Any]]) -> None:
    """What `serve deploy` of a file with these applications does: Serve reconciles to them and
    restarts only the applications whose code version (import path, runtime env, args)
    changed."""
    schema = ServeDeploySchema.model_validate({"applications": applications})
    _client().deploy_apps(schema)


def write_config(applications: list[dict[str, Any]], path: str) -> None:
    """The whole config, written atomically; the file's other top-level keys (http_options,
    proxy_location, ...) are kept."""
    target = Path(os.path.expandvars(path)).expanduser()
    previous: dict[str, Any] = {}
    if target.exists():
        previous = yaml.safe_load(target.read_text(encoding="utf-8")) or {}
    else:
        http = _client().http_config
        previous = {"proxy_location": "HeadOnly", "http_options": _http_options(http)}
    written = {**previous, "applications": applications}
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=target.parent, prefix=f".{target.name}.", delete=False, encoding="utf-8"
    ) as f:
        f.write(WRITTEN_HEADER)
        yaml.safe_dump(written, f, sort_keys=False)
    os.replace(f.name, target)
    logger.info("wrote the running config to %s", target)


def _http_options(http: Any) -> dict[str, Any]:
    return {"host": getattr(http, "host", "127.0.0.1"), "port": getattr(http, "port", 8000)}
