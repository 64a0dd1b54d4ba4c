"""The model replicas an ingress routes to, as Ray Serve keeps them.

Serve's controller owns the replica set: it starts, health-checks, drains and replaces
replicas, and pushes the running ones (with the metadata each published through
``ModelReplica.record_replica_metadata``: data-port host and port, pid, node) over its long
poll to every deployment handle's request router. ``request_router.PublishingRouter`` is the
model deployments' request router class (``RequestRouterConfig``): Serve's own power-of-two policy
for the calls that do go through a handle (``broadcast`` for ``mpsserve status``, tools),
and, each time Serve updates its replica set, a copy of that set handed to this process's
listeners. The ingress subscribes (``subscribe``) and routes its frames itself over that
set (``router.LeastLoaded``): no request pays a Serve call, and no list of our own exists
that could disagree with Serve's (a replica Serve stops leaves the set in one push).

Why not ``handle.choose_replica()`` per request: it reserves a slot on the replica actor
(global, enforced by the actor's semaphore), but that is a ``reserve_slot`` and a
``release_slot`` actor call per request plus Serve's router loop on another thread; measured
with ``python -m benchmarks.replica_choice`` (4 replicas, median of 3 rounds, 2026-12-01, a
2-core CPU machine shared with other test runs, load ~5: absolute figures are high, the
ratios are the point):

    choose_replica(), reserving (pow-2)            11650 us per request
    choose_replica(), pick only (_reserve=False)    1250 us
    replica set from Serve + LeastLoaded (_pick)     5.8 us

A custom request router class run through ``choose_replica`` pays the same calls and hops.

The in-flight bound across ingresses is kept where the frames meet instead: the replica's
data port (``replica_server``) answers a frame past ``max_ongoing_requests`` with
``Overloaded``.

Threads: the listeners run on Serve's router loop thread (one per process, Serve's), so
they only hand the list over (``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import RunningReplica

logger = logging.getLogger(__name__)

#: What a listener gets: one entry per running replica, ``key`` (Serve's replica id) and the
#: replica's published metadata (``model``, ``host``, ``port``, ``pid``, ``node``).
Listener = Callable[[list[dict[str, Any]]], None]
ROUTER_CLASS = "mpsserve.serving.request_router.PublishingRouter"

_lock = threading.Lock()
_listeners: dict[tuple[str, str], list[Listener]] = {}
_latest: dict[tuple[str, str], list[dict[str, Any]]] = {}


def entries(replicas: list[RunningReplica]) -> list[dict[str, Any]]:
    """The replicas that published a data port (all do once ready: the hook runs after the
    constructor, which opens the port), as listener entries."""
    return [
        {**r.replica_metadata, "key": r.replica_id.unique_id}
        for r in replicas
        if r.replica_metadata.get("port")
    ]


def publish(deployment: tuple[str, str], fresh: list[dict[str, Any]]) -> None:
    with _lock:
        _latest[deployment] = fresh
        listeners = list(_listeners.get(deployment, ()))
    for listener in listeners:
        try:
            listener(fresh)
        except Exception:  # a listener's bug must not stop Serve's router
            logger.exception("a replica-set listener failed")


def subscribe(handle: DeploymentHandle, listener: Listener) -> None:
    """Call ``listener`` with the deployment's running replicas now (if known) and at each
    change. Initialising the handle starts its router, whose long poll feeds the set."""
    deployment = (handle.app_name, handle.deployment_name)
    with _lock:
        _listeners.setdefault(deployment, []).append(listener)
        latest = _latest.get(deployment)
    if latest is not None:
        listener(latest)
    if not handle.is_initialized:
        handle._init()


def unsubscribe(handle: DeploymentHandle, listener: Listener) -> None:
    with _lock:
        listeners = _listeners.get((handle.app_name, handle.deployment_name), [])
        if listener in listeners:
            listeners.remove(listener)
