"""Whether the server and each model can serve, kept current for health checks that watch.

``HealthBoard.run`` looks every ``interval_s`` (one asyncio task on the ingress's loop): the
server is serving when every model has a replica to route to (``DataPlane.ready``); a model
is serving when it has one and that replica serves a version (its metadata answers, so an
unloaded model is not serving). Each change is handed to the listeners (the gRPC
``grpc.health.v1.Health`` servicer, whose Watch streams it) and kept in
``DataPlane.serving`` (the REST and gRPC model-ready answers read it, at no cost per call).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from mpsserve.errors import ModelNotReady, MpsServeError
from mpsserve.ingress.backends import ModelBackend

logger = logging.getLogger(__name__)

#: The whole server, as gRPC health names it.
SERVER = ""
INTERVAL_S = 1.0
METADATA_TIMEOUT_S = 2.0
Listener = Callable[[str, bool], Awaitable[None]]


class Plane(Protocol):
    """What health and Triton's extensions read of the ``DataPlane`` (no import cycle)."""

    serving: dict[str, bool]

    def models(self) -> list[str]: ...

    def backend(self, name: str) -> ModelBackend: ...

    async def ready(self) -> bool: ...

    async def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]: ...


class HealthBoard:
    def __init__(self, dataplane: Plane, interval_s: float = INTERVAL_S) -> None:
        self.dataplane, self.interval_s = dataplane, interval_s
        self.statuses: dict[str, bool] = {}
        self.listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run on the running loop (once; a second call is a no-op)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="health")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a round's failure must not end the watch
                logger.exception("health refresh failed")
            await asyncio.sleep(self.interval_s)

    async def refresh(self) -> dict[str, bool]:
        """Look once; tell the listeners what changed; the statuses now."""
        models = self.dataplane.models()
        looked = await asyncio.gather(*(self.model_serving(m) for m in models))
        now = dict(zip(models, looked, strict=True))
        now[SERVER] = await self.dataplane.ready()
        for name, value in now.items():
            if self.statuses.get(name) != value:
                await self.set(name, value)
        return now

    async def set(self, name: str, value: bool) -> None:
        """Record a status (also what a load or unload through this ingress just did)."""
        self.statuses[name] = value
        for listener in self.listeners:
            await listener(name, value)

    async def model_serving(self, name: str) -> bool:
        """A replica to route to, and it serves a version. Only a replica's own answer
        that it has none (ModelNotReady: not loaded, unloaded) makes a model with replicas
        not serving, and that is what ``DataPlane.serving`` keeps: a replica that is slow
        to answer (busy, at its bound) is not a sick one, and the router sets aside one
        that stopped answering, which ``backend.ready`` then says."""
        backend = self.dataplane.backend(name)
        if not await backend.ready():
            return False
        try:
            await asyncio.wait_for(backend.metadata(), METADATA_TIMEOUT_S)
        except ModelNotReady:
            self.dataplane.serving[name] = False
            return False
        except (MpsServeError, TimeoutError) as exc:
            logger.debug("model %s: no metadata for the health check: %s", name, exc)
            return self.dataplane.serving.get(name, True)
        self.dataplane.serving[name] = True
        return True
