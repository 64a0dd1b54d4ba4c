"""The ingress deployment: mpsserve's own HTTP and gRPC servers over a ``DataPlane`` whose
backends send frames straight to the model replicas' data ports.

Each ingress replica runs uvicorn (KServe v2 + TF-Serving REST) and a grpc.aio server (KServe
v2 gRPC) on one event loop, on a thread of its own; both bind their ports with SO_REUSEPORT,
so every ingress replica on a node shares the node's ports and the kernel spreads connections
over them. Ray Serve's proxies are off (``proxy_location: Disabled``): a request crosses one
Python process (this one) between the client and the GPU replica, and no pickling or object
store is involved. A poller thread reads the directory every second.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from mpsserve.config import IngressConfig
from mpsserve.dataplane import DataPlane
from mpsserve.serving.directory import Registration
from mpsserve.serving.grpc import start_grpc_server
from mpsserve.serving.http import create_http_app
from mpsserve.serving.logs import configure_replica_logging
from mpsserve.serving.replica_server import new_event_loop
from mpsserve.serving.router import AttemptPolicy, ReplicaBackend, Router
from mpsserve.serving.transport import KeyWatcher, TransportSpec

logger = logging.getLogger(__name__)
POLL_S = 1.0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket that other ingress replicas on this node may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Front:
    """The ingress's servers and router, on their own event loop and thread."""

    def __init__(
        self,
        config: IngressConfig,
        models: dict[str, int],
        directory: DeploymentHandle,
        transport: TransportSpec,
    ) -> None:
        self.config, self.directory = config, directory
        self.keys = KeyWatcher(transport.keys_name)
        self.loop = new_event_loop()
        self.max_bytes = int(config.max_request_mb * 2**20)
        self.router = Router(
            dict(models),
            # While Serve replaces replicas (an MPS daemon restart replaces them all) a request
            # waits for one up to its own deadline, less a directory poll, so that it fails
            # with "no replica is reachable" rather than a bare timeout.
            wait_for_replica_s=max(config.request_timeout_s - POLL_S, 0.0),
            set_aside_s=config.replica_set_aside_s,
            attempts=AttemptPolicy(
                min_s=config.attempt_timeout_min_s,
                p99_factor=config.attempt_timeout_p99_factor,
                max_attempts=config.max_attempts,
                request_timeout_s=config.request_timeout_s,
            ),
            keys=self.keys.get,
            limits=transport.limits,
        )
        self.dataplane = DataPlane(
            {name: ReplicaBackend(name, self.router) for name in models},
            max_request_bytes=self.max_bytes,
            request_timeout_s=config.request_timeout_s,
        )
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ingress", daemon=True)
        self._poller = threading.Thread(target=self._poll, name="directory-poll", daemon=True)
        self._http: Any = None
        self._grpc: Any = None
        self._node_ip = ray.util.get_node_ip_address()

    def start(self) -> None:
        """Bind both ports and serve; raises here (so Serve retries the replica) on failure."""
        import uvicorn

        sock = reuse_port_socket(self.config.host, self.config.http_port)
        http_config = uvicorn.Config(
            create_http_app(self.dataplane),
            lifespan="off",
            log_config=None,  # uvicorn's dictConfig would close Serve's log handlers
            log_level="warning",
            access_log=False,
            http="httptools",
            loop="none",
            timeout_keep_alive=75,
            # requests in flight at a redeploy may take up to their deadline to finish
            timeout_graceful_shutdown=math.ceil(self.config.request_timeout_s),
        )
        self._http = uvicorn.Server(http_config)
        self._thread.start()
        self._poller.start()
        self.keys.start()
        self._registration = Registration(self.directory, self._entry)
        self._registration.start()

        async def serve() -> None:
            self._grpc = await start_grpc_server(
                self.dataplane, self.config.host, self.config.grpc_port, self.max_bytes
            )
            self._http_task = asyncio.ensure_future(self._http.serve(sockets=[sock]))

        asyncio.run_coroutine_threadsafe(serve(), self.loop).result(timeout=30)
        logger.info(
            "ingress serving HTTP on %s:%d and gRPC on %s:%d",
            self.config.host,
            self.config.http_port,
            self.config.host,
            self.config.grpc_port,
        )

    def _poll(self) -> None:
        failing = False
        while not self._stopping.is_set():
            try:
                entries = self.directory.endpoints.remote().result(timeout_s=10)
                self.loop.call_soon_threadsafe(self.router.update, entries)
                failing = False
            except Exception as exc:  # the directory restarts: keep the last list
                if not failing:
                    logger.warning("cannot read the directory: %s", exc)
                failing = True
            self._stopping.wait(POLL_S)

    def on_loop(self, read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``read`` on the ingress's loop, which owns the router's and the data plane's
        state (another thread iterating them while requests change them would race)."""

        async def call() -> dict[str, Any]:
            return read()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=5)

    def _entry(self) -> dict[str, Any]:
        """This ingress in the directory (the heartbeat thread asks)."""
        return self.on_loop(self._entry_now)

    def _entry_now(self) -> dict[str, Any]:
        """Where this ingress listens and its recent figures."""
        return {
            "key": f"ingress:{self._node_ip}:{os.getpid()}",
            "kind": "ingress",
            "host": self._node_ip,
            "pid": os.getpid(),
            "node": socket.gethostname(),
            "http_port": self.config.http_port,
            "grpc_port": self.config.grpc_port,
            "recent": self.dataplane.recent.snapshot(),
            "replicas_routed": len(self.router.endpoints()),
        }

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not getattr(self._http, "should_exit", False)

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "endpoints": [
                {
                    "key": e.key,
                    "model": e.model,
                    "host": e.host,
                    "port": e.port,
                    "pid": e.pid,
                    "node": e.node,
                    "in_flight": e.in_flight,
                    "set_aside_s": round(max(e.set_aside_until - now, 0.0), 2),
                    "stalls": e.stalls,
                }
                for e in self.router.endpoints()
            ],
            "attempt_timeout_s": {
                model: round(self.router.attempt_timeout_s(model), 4)
                for model in self.router.max_in_flight
            },
        }

    def stop(self) -> None:
        """Leave the directory, close the listeners, let requests in flight finish."""
        self._stopping.set()
        self.keys.stop()
        if hasattr(self, "_registration"):
            self._registration.withdraw()

        async def shutdown() -> None:
            if self._http is not None:
                self._http.should_exit = True
            if self._grpc is not None:
                await self._grpc.stop(grace=self.config.request_timeout_s)
            task = getattr(self, "_http_task", None)
            if task is not None:
                await asyncio.wait_for(task, self.config.request_timeout_s + 5)

        if self._thread.is_alive():
            try:
                done = asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
                done.result(timeout=self.config.request_timeout_s + 10)
            except Exception as exc:
                logger.warning("ingress shutdown: %s", exc)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


@serve.deployment(name="ingress")
class Ingress:
    def __init__(
        self,
        directory: DeploymentHandle,
        models: dict[str, int],
        ingress: dict[str, Any],
        deployments: list[DeploymentHandle] | None = None,
        transport: TransportSpec | None = None,
    ) -> None:
        """``models``: each model's name and the requests one of its replicas takes at a
        time; ``deployments``: the model deployments' handles (only to keep them bound);
        ``transport``: the data ports' key and bounds (``serving.transport``)."""
        configure_replica_logging()
        spec = transport or TransportSpec(serve.get_replica_context().app_name)
        self._front = Front(IngressConfig.model_validate(ingress), models, directory, spec)
        self._front.start()

    def check_health(self) -> None:
        if not self._front.alive:
            raise RuntimeError("the ingress's HTTP/gRPC servers stopped")

    def describe(self) -> dict[str, Any]:
        """What this ingress routes to (``wait_routable`` reads it)."""
        return self._front.on_loop(self._front.describe)

    def __del__(self) -> None:
        self._front.stop()
