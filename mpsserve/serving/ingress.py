"""The ingress deployment: mpsserve's own HTTP and gRPC servers over a ``DataPlane`` whose
backends send frames straight to the model replicas' data ports.

Each ingress replica runs uvicorn (KServe v2 + TF-Serving REST) and a grpc.aio server (KServe
v2 gRPC) on one event loop, on a thread of its own; both bind their ports with SO_REUSEPORT,
so every ingress replica on a node shares the node's ports and the kernel spreads connections
over them. Ray Serve's proxies are off (``proxy_location: Disabled``): a request crosses one
Python process (this one) between the client and the GPU replica, and no pickling or object
store is involved. Which model replicas exist, and where their data ports are, comes from
Serve's long poll of each model deployment's replica set (``serving.replica_set``).

Threads of an ingress replica process: Serve's replica event loop (health checks,
``describe``), the ingress loop (``ingress``: uvicorn on the API port and on the metrics
port (``serving.metrics_port``), grpc.aio, the router), Serve's router loop for the model
deployments' handles (it receives the replica-set pushes), the transport key reloader
(``transport-keys``), the default executor's threads (a scrape's agent lookup and filter;
Triton's statistics and repository calls, which make Serve's blocking calls), and grpc.aio's
own threads. On the ingress loop, besides the servers' own tasks, one task refreshes the
health statuses every second (``ingress.health``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import resource
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from mpsserve.config import CHECK_FILES, IngressConfig
from mpsserve.ingress import auth as _auth
from mpsserve.ingress.backends import ReplicaBackend
from mpsserve.ingress.dataplane import DataPlane
from mpsserve.ingress.grpc import GrpcLimits, start_grpc_server
from mpsserve.ingress.guard import GuardLimits, guarded_protocol
from mpsserve.ingress.http import create_http_app
from mpsserve.ingress.metrics_port import host_port
from mpsserve.ingress.replica_server import new_event_loop
from mpsserve.ingress.router import DEFAULT_MAX_IN_FLIGHT, AttemptPolicy, Router
from mpsserve.ingress.transport import KeyWatcher, TransportSpec
from mpsserve.serving import replica_set
from mpsserve.serving.logs import configure_replica_logging
from mpsserve.serving.metrics_port import metrics_server
from mpsserve.serving.repository import ServeAdmin

logger = logging.getLogger(__name__)
#: Share of the file limit connections may take (the rest: Ray, logs, replica sockets).
CONNECTION_FD_SHARE = 0.8
#: Share of the file limit open beyond which the health check fails (cannot accept).
UNHEALTHY_FD_SHARE = 0.95
#: How long the ingress's event loop may take to run a no-op before the health check fails.
LOOP_STALL_S = 2.0


def raise_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (a no-op when equal); the
    soft limit now in force. Every connection costs a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the file limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_caps(config: IngressConfig, file_limit: int) -> tuple[int, int]:
    """(HTTP, gRPC) connection caps: the configured ones, lowered so that both together stay
    within CONNECTION_FD_SHARE of the file limit (gRPC gets at most a quarter of it)."""
    budget = int(file_limit * CONNECTION_FD_SHARE)
    grpc_cap = max(1, min(config.limits.max_grpc_connections, budget // 4))
    http_cap = max(1, min(config.limits.max_connections, budget - grpc_cap))
    return http_cap, grpc_cap


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


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
        models: list[str],
        handles: dict[str, DeploymentHandle],
        transport: TransportSpec,
    ) -> None:
        self.config, self.handles = config, handles
        self.keys = KeyWatcher(transport.keys_name)
        self.loop = new_event_loop()
        self.max_bytes = int(config.max_request_mb * 2**20)
        self.router = Router(
            # each model's bound per replica arrives with its replicas (their metadata)
            dict.fromkeys(models, DEFAULT_MAX_IN_FLIGHT),
            # While Serve replaces replicas (an MPS daemon restart replaces them all) a request
            # waits for one up to its own deadline, less a second, so that it fails with
            # "no replica is reachable" rather than a bare timeout.
            wait_for_replica_s=max(config.request_timeout_s - 1.0, 0.0),
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
            max_in_flight=config.limits.max_in_flight_requests,
            admin=self._admin(handles),
            repository_api=config.repository_api,
        )
        self.file_limit = raise_file_limit()
        self.http_cap, self.grpc_cap = connection_caps(config, self.file_limit)
        self.auth = self._authenticator()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ingress", daemon=True)
        self._listeners = {
            model: functools.partial(self._replicas_changed, model) for model in handles
        }
        self._http: Any = None
        self._grpc: Any = None
        self._metrics: Any = None  # the metrics port's server (ingress.metrics_port)
        self._node_ip = ray.util.get_node_ip_address()

    def start(self) -> None:
        """Bind both ports and serve; raises here (so Serve retries the replica) on failure."""
        import uvicorn

        limits = self.config.limits
        self._sock = sock = reuse_port_socket(self.config.host, self.config.http_port)
        http_config = uvicorn.Config(
            create_http_app(self.dataplane, limits.retry_after_s, self.config.api_docs),
            lifespan="off",
            log_config=None,  # uvicorn's dictConfig would close Serve's log handlers
            log_level="warning",
            access_log=False,
            http=guarded_protocol(self._guard_limits(), self.auth),
            loop="none",
            timeout_keep_alive=math.ceil(limits.keepalive_timeout_s),
            # requests in flight at a redeploy may take up to their deadline to finish
            timeout_graceful_shutdown=math.ceil(self.config.request_timeout_s),
        )
        if self.config.tls is not None:  # our context (TLS 1.2+, mTLS), not uvicorn's
            http_config.load()
            http_config.ssl = _auth.server_ssl_context(self.config.tls)
        self._http = uvicorn.Server(http_config)
        metrics_sock = self._bind_metrics_port()
        self._thread.start()
        self.keys.start()
        for model, handle in self.handles.items():
            replica_set.subscribe(handle, self._listeners[model])

        tls = self.config.tls

        async def serve() -> None:
            self._grpc = await start_grpc_server(
                self.dataplane,
                self.config.host,
                self.config.grpc_port,
                self._grpc_limits(),
                credentials=_auth.grpc_server_credentials(tls) if tls else None,
                interceptors=[_auth.AuthInterceptor(self.auth)] if self.auth else [],
                reflection=self.config.grpc_reflection,
            )
            self._http_task = asyncio.ensure_future(self._http.serve(sockets=[sock]))
            if metrics_sock is not None:
                self._metrics_task = asyncio.ensure_future(
                    self._metrics.serve(sockets=[metrics_sock])
                )

        asyncio.run_coroutine_threadsafe(serve(), self.loop).result(timeout=30)
        logger.info(
            "ingress serving HTTP on %s:%d and gRPC on %s:%d; at most %d HTTP and %d gRPC "
            "connections (file limit %d), %d requests in flight",
            self.config.host,
            self.config.http_port,
            self.config.host,
            self.config.grpc_port,
            self.http_cap,
            self.grpc_cap,
            self.file_limit,
            limits.max_in_flight_requests,
        )
        logger.info("public ports: %s", _auth.describe(self.config.auth, self.config.tls))

    def _bind_metrics_port(self) -> socket.socket | None:
        """The metrics port's socket and server (None: ``ingress.metrics_port`` is off)."""
        port = self.config.metrics_port
        if port is None:
            return None
        sock = reuse_port_socket(self.config.metrics_host or self.config.host, port)
        self._metrics = metrics_server(self.config, serve.get_replica_context().app_name)
        logger.info("metrics: GET /metrics on port %d (this node's service series)", port)
        return sock

    @staticmethod
    def _admin(handles: dict[str, DeploymentHandle]) -> ServeAdmin | None:
        """Triton's statistics and repository API ask the model replicas through Serve."""
        if not handles:
            return None
        return ServeAdmin(handles, next(iter(handles.values())).app_name)

    def _authenticator(self) -> _auth.Authenticator | None:
        """The token check, or None when ``ingress.auth`` is off (nothing then runs)."""
        if self.config.auth is None:
            return None
        return _auth.Authenticator.of(self.config.auth, _auth.refused_now(self.dataplane.rejected))

    def _guard_limits(self) -> GuardLimits:
        return GuardLimits.of(self.config.limits, self.http_cap, self.max_bytes)

    def _grpc_limits(self) -> GrpcLimits:
        limits = self.config.limits
        return GrpcLimits(
            max_bytes=self.max_bytes,
            max_metadata_bytes=limits.max_header_kb * 1024,
            handshake_timeout_s=limits.header_timeout_s,
            max_connections=self.grpc_cap,
            max_concurrent_streams=limits.grpc_max_concurrent_streams,
            # inference is refused past max_in_flight by the data plane; the margin keeps
            # health and metadata RPCs answered meanwhile
            max_concurrent_rpcs=limits.max_in_flight_requests + 64,
            idle_timeout_s=limits.grpc_idle_timeout_s,
            max_connection_age_s=limits.grpc_max_connection_age_s,
            keepalive_s=limits.grpc_keepalive_s,
            min_ping_interval_s=limits.grpc_min_ping_interval_s,
        )

    def _replicas_changed(self, model: str, entries: list[dict[str, Any]]) -> None:
        """Serve pushed ``model``'s running replicas (on its router thread): hand them to
        the router on the ingress loop, which owns it."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.router.update, model, entries)

    def on_loop(self, read: Callable[[], dict[str, Any]], timeout_s: float = 5.0) -> dict[str, Any]:
        """Run ``read`` on the ingress's loop, which owns the router's and the data plane's
        state (another thread iterating them while requests change them would race)."""

        async def call() -> dict[str, Any]:
            return read()

        future = asyncio.run_coroutine_threadsafe(call(), self.loop)
        try:
            return future.result(timeout=timeout_s)
        finally:
            future.cancel()

    def entry(self) -> dict[str, Any]:
        """Where this ingress listens and its recent figures (``mpsserve status``)."""
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
            "metrics_port": self.config.metrics_port,
            "metrics_address": self._metrics_address(),
            "recent": self.dataplane.recent.snapshot(),
            "replicas_routed": len(self.router.endpoints()),
        }

    def _metrics_address(self) -> str | None:
        """``host:port`` where Prometheus reaches this node's metrics port (None: off)."""
        if self.config.metrics_port is None:
            return None
        bind = self.config.metrics_host or self.config.host
        host = self._node_ip if bind in ("0.0.0.0", "::", "") else bind
        return host_port(host, self.config.metrics_port)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not getattr(self._http, "should_exit", False)

    def health_problem(self) -> str | None:
        """Why this ingress cannot take connections now, or None. Serve replaces a replica
        whose check fails, so this is red only for what a new replica would fix: servers
        stopped, the event loop stuck (nothing is accepted or answered), file descriptors
        nearly exhausted (accept fails). Shedding load is working as designed: not red."""
        if not self.alive:
            return "the ingress's HTTP/gRPC servers stopped"
        if self._sock.fileno() < 0:
            return "the HTTP listening socket is closed"
        used = open_files()
        if used > self.file_limit * UNHEALTHY_FD_SHARE:
            return f"{used} of {self.file_limit} file descriptors are open"
        try:
            self.on_loop(dict, timeout_s=LOOP_STALL_S)
        except TimeoutError:
            return f"the event loop did not run a no-op within {LOOP_STALL_S:g}s"
        return None

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
            "full_answers": dict(self.router.full_answers),
        }

    def stop(self) -> None:
        """Close the listeners, let requests in flight finish."""
        self._stopping.set()
        self.keys.stop()
        for model, handle in self.handles.items():
            replica_set.unsubscribe(handle, self._listeners[model])

        async def shutdown() -> None:
            self.dataplane.health.stop()
            if self._http is not None:
                self._http.should_exit = True
            if self._metrics is not None:
                self._metrics.should_exit = True
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
        models: list[str],
        ingress: dict[str, Any],
        deployments: dict[str, DeploymentHandle],
        transport: TransportSpec | None = None,
    ) -> None:
        """``models``: the model names, and nothing else of the models' settings, so that
        a change to one model's settings leaves the ingress running (the bound of each
        replica comes with Serve's replica set); ``deployments``: each model's deployment
        handle (its replica set is what the ingress routes over); ``transport``: the data
        ports' key and bounds."""
        configure_replica_logging()
        spec = transport or TransportSpec(serve.get_replica_context().app_name)
        # the token, certificate and key files must be readable where the ingress runs
        config = IngressConfig.model_validate(ingress, context={CHECK_FILES: True})
        self._front = Front(config, models, deployments, spec)
        self._front.start()

    def check_health(self) -> None:
        problem = self._front.health_problem()
        if problem is not None:
            raise RuntimeError(problem)

    def describe(self) -> dict[str, Any]:
        """What this ingress routes to (``wait_routable`` reads it)."""
        return self._front.on_loop(self._front.describe)

    def entry(self) -> dict[str, Any]:
        """This ingress for ``mpsserve status`` (Serve's ``broadcast`` asks every one)."""
        return self._front.entry()

    def __del__(self) -> None:
        self._front.stop()
