"""The model-management routes' logic: list, add, remove, load and unload models of the running
service. Every change is one edit of the config Serve runs (serve_app/live_config.py), applied
through Serve's declarative API (deployments/model_admin.py), so only the changed application
restarts. A new routing table (add, remove) reaches the running ingress in place, as its
deployment's user_config (`Ingress.reconfigure`; serve_app/live_config.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployments.model_admin import apply_applications, read_running_applications, write_config
from deployments.readiness import ModelReadiness, ModelStatus
from serve_app import live_config
from serve_app.config import ModelConfig
from serve_app.errors import InvalidRequestError, ModelNotFoundError
from serve_app.model_store import ModelSourceError, resolve_source

logger = logging.getLogger(__name__)

Edit = Callable[[dict[str, Any]], dict[str, Any]]
POLL_S = 0.5
ROUTE_POLL_S = 0.05  # the ingress's own table: no controller call to read it
SOURCE_CHECK_TIMEOUT_S = 30.0


class ModelManager:
    def __init__(
        self,
        readiness: ModelReadiness,
        wake: Callable[[str], Any],
        config_file: str | None,
        routed: Callable[[], list[str]],
    ) -> None:
        self.readiness = readiness
        self.wake = wake  # model id -> an awaitable call that a replica must answer
        self.config_file = config_file
        self.routed = routed  # the model ids this ingress routes now (its table)
        self._lock = asyncio.Lock()  # one change at a time: each edits the config the last made

    async def describe(self, model_ids: list[str]) -> list[dict[str, Any]]:
        """Each model's config entry, status and whether it is unloaded."""
        config = await self._running_config()
        statuses = await self.readiness.statuses(model_ids)
        return [self._entry(config, model_id, statuses[model_id]) for model_id in model_ids]

    async def add(self, model: ModelConfig, timeout_s: float) -> dict[str, Any]:
        await check_source(model)
        deadline = time.monotonic() + timeout_s
        await self._change(lambda config: live_config.add_model(config, model))
        status = await self._wait_for(model.id, {"ready", "idle", "failed"}, timeout_s)
        await self._wait_for_route(model.id, True, deadline)
        return {"id": model.id, "kind": model.kind, "status": status}

    async def remove(self, model_id: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        await self._change(lambda config: live_config.remove_model(config, model_id))
        is_gone = await self._wait_until_gone(model_id, timeout_s)
        is_unrouted = await self._wait_for_route(model_id, False, deadline)
        return {"id": model_id, "status": "removed" if is_gone and is_unrouted else "removing"}

    async def load(self, model_id: str, timeout_s: float) -> dict[str, Any]:
        """The model's own options again (if it was unloaded), and a replica up: answers once one
        has answered a call (Serve wakes a deployment at zero for a queued call)."""
        config = await self._running_config()
        if live_config.is_unloaded(config, model_id):
            await self._change(lambda c: live_config.set_unloaded(c, model_id, False))
        async with self.readiness.waking(model_id):
            try:
                await asyncio.wait_for(self.wake(model_id), timeout_s)
            except Exception as exc:  # timed out or refused: answered with the status it reached
                logger.warning("waking %s: %r", model_id, exc)
            await self.readiness.refresh()
        status = await self._wait_for(model_id, {"ready", "failed"}, timeout_s=2.0)
        return {"id": model_id, "status": status}

    async def unload(self, model_id: str, timeout_s: float) -> dict[str, Any]:
        """Scaled to zero once its open streams end; the next request (or load) wakes it."""
        await self._change(lambda config: live_config.set_unloaded(config, model_id, True))
        status = await self._wait_for(model_id, {"idle", "failed"}, timeout_s)
        return {"id": model_id, "status": status, "unloaded": True}

    async def _change(self, edit: Edit) -> None:
        async with self._lock:
            config = await self._running_config()
            edited = edit(config)
            await asyncio.to_thread(apply_applications, edited["applications"])
            if self.config_file:
                await asyncio.to_thread(write_config, edited["applications"], self.config_file)
        await self.readiness.refresh()

    async def _running_config(self) -> dict[str, Any]:
        return {"applications": await asyncio.to_thread(read_running_applications)}

    async def _wait_for(self, model_id: str, wanted: set[str], timeout_s: float) -> ModelStatus:
        deadline = time.monotonic() + timeout_s
        while True:
            status = (await self.readiness.statuses([model_id]))[model_id]
            if status in wanted or time.monotonic() >= deadline:
                return status
            await asyncio.sleep(POLL_S)
            await self.readiness.refresh()

    async def _wait_until_gone(self, model_id: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await self.readiness.refresh()
            if not await self.readiness.is_deployed(model_id):
                return True
            await asyncio.sleep(POLL_S)
        return False

    async def _wait_for_route(self, model_id: str, is_routed: bool, deadline: float) -> bool:
        """Until this ingress's table has (or no longer has) the model: Serve hands the new
        table over (`Ingress.reconfigure`) after applying the change, and a model's application
        can be up or gone before that; answering first would let a request right after an add
        meet the old table's 404 (or a re-add after a remove its 409)."""
        while (model_id in self.routed()) != is_routed:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(ROUTE_POLL_S)
        return True

    def _entry(self, config: dict[str, Any], model_id: str, status: str) -> dict[str, Any]:
        try:
            entry = live_config.model_entry(config, model_id)
            is_unloaded = live_config.is_unloaded(config, model_id)
        except ModelNotFoundError:  # routed, but its application is gone (being removed)
            entry, is_unloaded = {"id": model_id}, False
        return {
            **entry,
            "status": status,
            "unloaded": is_unloaded,
            "error": self.readiness.load_error(model_id) if status == "failed" else None,
        }


async def check_source(model: ModelConfig) -> None:
    """A 400 naming `source` when it cannot be found on this node (nothing is loaded)."""
    try:
        await asyncio.wait_for(asyncio.to_thread(_find_source, model), SOURCE_CHECK_TIMEOUT_S)
    except ModelSourceError as exc:
        raise InvalidRequestError(str(exc), param="source", code="invalid_source") from exc
    except TimeoutError as exc:
        raise InvalidRequestError(
            f"model '{model.id}': source '{model.source}' was not found within "
            f"{SOURCE_CHECK_TIMEOUT_S:.0f}s",
            param="source",
            code="invalid_source",
        ) from exc


def _find_source(model: ModelConfig) -> None:
    if model.source.startswith("pkg-assemble://"):  # assembling is the replica's job
        package = model.source.removeprefix("pkg-assemble://")
        if importlib.util.find_spec(package) is None:
            raise ModelSourceError(
                f"model '{model.id}': cannot resolve source '{model.source}': package "
                f"'{package}' is not installed"
            )
        return
    resolve_source(model, Path("/nonexistent-cache"))  # only pkg-assemble uses the cache dir
