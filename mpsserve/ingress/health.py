"""Whether the server and each model can serve, kept current for health checks that watch.

``HealthBoard.run`` looks every ``interval_s`` (one asyncio task on the ingress's loop): the
server is serving when every model has a replica to route to; a model is serving when it has
one and that replica serves a version (its metadata answers, so an unloaded model is not
serving). Each change is handed to the listeners (the gRPC ``grpc.health.v1.Health``
servicer, whose Watch streams it); what replicas say about their version is kept in
``DataPlane.serving`` (the REST and gRPC model-ready answers read it, at no cost per call).

Serve takes a replica out of its running set while ``reconfigure`` runs (a version policy
change), and a request waits for a replica meanwhile rather than failing; so a model that was
serving stays so until it has had no replica for ``REPLICA_GRACE_S`` (a probe would otherwise
pull a healthy server out of a load balancer for a second at every policy change).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from mpsserve.errors import ModelNotReady, MpsServeError
from mpsserve.ingress.backends import ModelBackend

logger = logging.getLogger(__name__)

#: The whole server, as gRPC health names it.
SERVER = ""
INTERVAL_S = 1.0
METADATA_TIMEOUT_S = 2.0
REPLICA_GRACE_S = 5.0
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
        self._no_replica_since: dict[str, float] = {}
        self.replica_grace_s = REPLICA_GRACE_S

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
        routable = [await self._routable(m) for m in models]
        pairs = list(zip(models, routable, strict=True))
        looked = await asyncio.gather(*(self._versioned(m) for m, up in pairs if up))
        served = dict(zip([m for m, up in pairs if up], looked, strict=True))
        now = {m: served.get(m, False) for m in models}
        now[SERVER] = all(routable)
        for name, value in now.items():
            if self.statuses.get(name) != value:
                await self.set(name, value)
        return now

    async def set(self, name: str, value: bool) -> None:
        """Record a status (also what a load or unload through this ingress just did)."""
        self.statuses[name] = value
        for listener in self.listeners:
            await listener(name, value)

    async def _routable(self, name: str) -> bool:
        """It has a replica, or had one within ``REPLICA_GRACE_S`` while it was serving."""
        if await self.dataplane.backend(name).ready():
            self._no_replica_since.pop(name, None)
            return True
        since = self._no_replica_since.setdefault(name, time.monotonic())
        return self.statuses.get(name, False) and time.monotonic() - since < self.replica_grace_s

    async def _versioned(self, name: str) -> bool:
        """Its replica serves a version. Only a replica's own answer that it has none
        (ModelNotReady: not loaded, unloaded) says no, and that is what ``DataPlane.serving``
        keeps: a replica slow to answer (busy, at its bound) is not a sick one, and the
        router sets aside one that stopped answering (then it is not routable)."""
        backend = self.dataplane.backend(name)
        if not await backend.ready():  # in its grace period: as it was
            return self.statuses.get(name, False)
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
