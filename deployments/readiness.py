"""Each model's status (ready, idle, loading, failed) for /health, /v1/models and the admin
routes, without a call that queues behind generation or wakes an idle model on every probe.

Ray Serve's own view (`serve.status()`, read off the event loop, cached `status_ttl_s`) says
whether a model's deployment has a RUNNING replica. A replica whose weights failed to load stays
up on purpose and Serve calls it healthy, so each model's `info` (load error, context length) is
asked once per deployment of its application (`last_deployed_time_s`) and kept; the first probe
waits `info_timeout_s` for it. While that answer is pending (the replica is busy), Serve's view
decides: a replica without weights refuses every call at once, so it is never too busy to answer.
A model scaled to zero (idle_timeout_s, or unloaded) has no replica to ask, so Serve's view alone
says idle or loading: nothing here ever sends it a request. The one exception is a load this
ingress is running (`waking`): Serve's view can still read idle for seconds after the wake-up
call was sent (before the autoscaler adds the replica, or for the whole of a fast start), and a
client that asked for the load must read "loading" from the first probe on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from ray import serve

logger = logging.getLogger(__name__)

InfoCall = Callable[[str], Awaitable[Any]]
ModelStatus = Literal["ready", "idle", "loading", "failed"]
INFO_RETRY_S = 5.0  # after a failed info call, Serve's view alone decides this long
# Serve's view is read this often at most while a deployment is getting a replica: at a cold
# start /health turned 200 up to status_ttl_s after the last replica was up.
STARTING_STATUS_TTL_S = 0.25
# Serve's deployment statuses in which a deployment without a running replica is getting one.
_GROWING = frozenset({"UPDATING", "UPSCALING"})
_FAILED = frozenset({"DEPLOY_FAILED", "UNHEALTHY"})


@dataclass(frozen=True, slots=True)
class DeploymentView:
    num_running: int
    deployed_at: float  # the application's last_deployed_time_s: a new one asks info again
    num_starting: int = 0
    status: str = "HEALTHY"  # Serve's DeploymentStatus
    message: str = ""

    @property
    def status_without_replica(self) -> ModelStatus:
        """What a deployment with no RUNNING replica is: starting one, failed, or idle."""
        if self.status in _FAILED:
            return "failed"
        return "loading" if self.num_starting or self.status in _GROWING else "idle"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    deployed_at: float
    is_ready: bool
    context_length: int | None
    error: str | None = None


def read_deployment_views() -> dict[str, DeploymentView]:
    """Deployment name -> its view. Blocking (a controller call): run it off the loop. A model's
    deployment is named by its id; its own application (same name) wins over another's."""
    views: dict[str, DeploymentView] = {}
    for app_name, application in serve.status().applications.items():
        for name, deployment in application.deployments.items():
            states = {_name(s): n for s, n in deployment.replica_states.items()}
            if name not in views or name == app_name:
                views[name] = DeploymentView(
                    num_running=states.get("RUNNING", 0),
                    deployed_at=application.last_deployed_time_s,
                    num_starting=states.get("STARTING", 0) + states.get("PENDING_MIGRATION", 0),
                    status=_name(deployment.status),
                    message=deployment.message or "",
                )
    return views


def _name(value: Any) -> str:
    return str(getattr(value, "value", value))


class ModelReadiness:
    def __init__(
        self, ask_info: InfoCall, status_ttl_s: float = 1.5, info_timeout_s: float = 0.5
    ) -> None:
        self.ask_info = ask_info
        self.status_ttl_s = status_ttl_s
        self.info_timeout_s = info_timeout_s
        self._views: dict[str, DeploymentView] = {}
        self._views_at: float | None = None
        self._views_lock = asyncio.Lock()
        self._infos: dict[str, ModelInfo] = {}
        self._pending: dict[str, asyncio.Task[Any]] = {}
        self._failed_at: dict[str, float] = {}
        self._num_waking: dict[str, int] = {}

    @asynccontextmanager
    async def waking(self, model_id: str) -> AsyncIterator[None]:
        """While inside, a model without a running replica reads "loading", never "idle"."""
        self._num_waking[model_id] = self._num_waking.get(model_id, 0) + 1
        try:
            yield
        finally:
            self._num_waking[model_id] -= 1
            if not self._num_waking[model_id]:
                del self._num_waking[model_id]

    async def statuses(self, model_ids: list[str]) -> dict[str, ModelStatus]:
        views = await self._deployment_views()
        results = await asyncio.gather(*(self._status(m, views.get(m)) for m in model_ids))
        return dict(zip(model_ids, results, strict=True))

    async def refresh(self) -> None:
        """Forget Serve's cached view: the next probe reads it again (after an admin change)."""
        async with self._views_lock:
            self._views_at = None

    async def is_deployed(self, model_id: str) -> bool:
        """Whether Serve still has the model's deployment (removing ends when it is gone)."""
        return model_id in await self._deployment_views()

    def context_length(self, model_id: str) -> int | None:
        info = self._infos.get(model_id)
        return info.context_length if info else None

    def load_error(self, model_id: str) -> str | None:
        info = self._infos.get(model_id)
        return info.error if info else None

    async def _status(self, model_id: str, view: DeploymentView | None) -> ModelStatus:
        if view is None:  # not in Serve's status yet (being deployed), or no controller
            return "loading"
        if view.num_running == 0:
            status = view.status_without_replica
            return "loading" if status == "idle" and model_id in self._num_waking else status
        info = self._infos.get(model_id)
        if info is None or info.deployed_at != view.deployed_at:
            info = await self._fetch_info(model_id, view.deployed_at)
        return "failed" if info and not info.is_ready else "ready"

    async def _fetch_info(self, model_id: str, deployed_at: float) -> ModelInfo | None:
        if time.monotonic() - self._failed_at.get(model_id, -INFO_RETRY_S) < INFO_RETRY_S:
            return None
        if model_id in self._pending:  # asked already and queued: do not wait on it again
            return None
        try:
            task = asyncio.ensure_future(self.ask_info(model_id))
        except Exception as exc:  # the handle refused the call outright
            logger.warning("info of %s failed: %r", model_id, exc)
            self._failed_at[model_id] = time.monotonic()
            return None
        self._pending[model_id] = task
        task.add_done_callback(lambda t: self._keep(model_id, deployed_at, t))
        await asyncio.wait({task}, timeout=self.info_timeout_s)  # never cancels the call
        return self._infos.get(model_id)

    def _keep(self, model_id: str, deployed_at: float, task: asyncio.Task[Any]) -> None:
        self._pending.pop(model_id, None)
        answer = None if task.cancelled() or task.exception() else task.result()
        if not isinstance(answer, dict):
            self._failed_at[model_id] = time.monotonic()
            return
        context_length = answer.get("context_length") or self.context_length(model_id)
        is_ready, error = bool(answer.get("ready")), answer.get("error")
        self._infos[model_id] = ModelInfo(deployed_at, is_ready, context_length, error)

    async def _deployment_views(self) -> dict[str, DeploymentView]:
        async with self._views_lock:  # concurrent probes share one controller call
            now = time.monotonic()
            if self._views_at is None or now - self._views_at >= self._views_ttl_s():
                self._views = await self._read_views()
                self._views_at = time.monotonic()
        return self._views

    def _views_ttl_s(self) -> float:
        """status_ttl_s, shorter while the cached view shows a replica starting (or nothing)."""
        starting = not self._views or any(
            view.num_starting or view.status in _GROWING for view in self._views.values()
        )
        return min(self.status_ttl_s, STARTING_STATUS_TTL_S) if starting else self.status_ttl_s

    async def _read_views(self) -> dict[str, DeploymentView]:
        try:
            return await asyncio.to_thread(read_deployment_views)
        except Exception as exc:  # controller unreachable: nothing reads as ready
            logger.warning("serve.status() failed: %r", exc)
            return {}
