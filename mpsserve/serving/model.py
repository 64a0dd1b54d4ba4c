"""The model deployment: each replica is one process holding one ``Servable``.

Ray Serve places the replica (a fractional GPU under MPS), health-checks it, drains and
replaces it; requests reach it on its own data port (``ReplicaServer``), whose address it
publishes through Serve (``record_replica_metadata``): Serve hands it to every ingress with
the replica set (``serving.replica_set``), so no list of our own exists.

Order, as Serve's replica runs it: the constructor (the data port opens here, answering
``ModelNotReady`` until the model is loaded), ``record_replica_metadata`` (captured once),
``reconfigure`` (the first load), then the replica joins the running set and the ingresses
start sending.

Threads of a model replica process: Serve's replica event loop (health checks, handle
calls), the data port's event loop (``replica-server``) and its inference pool
(``infer-*``, ``settings.replica_threads``), the transport key reloader
(``transport-keys``), the store watcher and the MPS guardian / fault watcher (``Servable``,
``ReplicaMps``), the node's metrics sampler in the one replica that leads the node's guardian,
and, after a device fault, ``fault-exit`` (ends the process).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import ray
from ray import serve

from mpsserve import metrics
from mpsserve.config import EmbeddingsConfig, ModelConfig, VersionPolicy, parse_model
from mpsserve.errors import ConfigError, MpsServeError
from mpsserve.ingress.replica_server import ReplicaServer
from mpsserve.ingress.stats import ReplicaStats, Timing
from mpsserve.ingress.transport import KeyWatcher, TransportSpec
from mpsserve.model.servable import Servable
from mpsserve.node import hook
from mpsserve.node.faults import GpuFault
from mpsserve.node.guardian import ReplicaMps
from mpsserve.protocol import frame
from mpsserve.serving.logs import configure_replica_logging
from mpsserve.settings import settings

logger = logging.getLogger(__name__)


def replica_model(name: str) -> ModelConfig:
    """This replica's model settings, from its environment (``serving.app.model_env``)."""
    text = settings().model_config
    if not text:
        raise ConfigError(
            f"model {name!r}: the replica has no model settings in its environment "
            "(MPSSERVE_MODEL_CONFIG; the app builder and the Serve config's deployment "
            "overrides set it)"
        )
    config = parse_model(text, f"model-{name}'s MPSSERVE_MODEL_CONFIG")
    if config.name != name:
        raise ConfigError(f"deployment model-{name} was given the settings of {config.name!r}")
    return config


@serve.deployment(name="model")
class ModelReplica:
    """The model's settings arrive in the process's environment (``replica_model``): Serve
    starts new replicas when they change. The version policy arrives as ``user_config``:
    Serve calls ``reconfigure`` after the constructor (the first load happens there) and
    again whenever only the policy changes, without restarting the replica.
    The repository API's load and unload change the same ``user_config`` (``loaded``: false
    unloads) through Serve's controller (``serving.repository``), so every replica, and any
    Serve starts later, follows."""

    def __init__(
        self,
        name: str,
        transport: TransportSpec | None = None,
        embeddings: dict[str, Any] | None = None,
    ) -> None:
        config = replica_model(name)
        configure_replica_logging()
        hook.worker_setup()  # the daemon and this process's limits, before any CUDA call
        gpus = [str(g) for g in ray.get_gpu_ids()]
        tier = EmbeddingsConfig.model_validate(embeddings) if embeddings else None
        self._servable = Servable(config, device="auto" if gpus else "cpu", embeddings=tier)
        # The first CUDA call is the model load (``reconfigure``).
        self._mps = ReplicaMps(hook.replica_config().mps, gpu=gpus[0] if gpus else None)
        self._servable.on_fault = self._device_fault
        self._servable.memory_limit = self._mps.memory_limit()
        self._leaving = threading.Lock()
        self._mps.watch_faults(self._peer_fault)
        self._mps.start_guardian()
        self._transport = transport or TransportSpec(serve.get_replica_context().app_name)
        self._stall_s = config.placement.inference_stall_s
        self._serve_tags = metrics.ServeTags.of_replica()
        self._stats = ReplicaStats()  # Triton's statistics, per version (ingress.stats)
        self._server = self._open_data_port(config.placement.max_ongoing_requests)
        self._servable.drain = self._drain

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._servable.set_policy(VersionPolicy.model_validate(user_config["version_policy"]))
        if not user_config.get("loaded", True):
            self._servable.unload()
            self._servable.start_watching()  # the index still shows the store's versions
            return
        self._servable.reload()
        if not self._servable.ready:
            self._servable.load()
            self._mps.verify()
            self._servable.start_watching()

    def _open_data_port(self, max_in_flight: int) -> ReplicaServer:
        """The data port, bounded at the deployment's ``max_ongoing_requests`` for all
        ingresses together (``ReplicaServer``)."""
        bind, self._host = self._transport.hosts()
        keys = KeyWatcher(self._transport.keys_name)
        keys.start()
        server = ReplicaServer(
            self.handle_frame,
            threads=settings().replica_threads,
            keys=keys.get,
            host=bind,
            limits=self._transport.limits,
            max_in_flight=max_in_flight,
        )
        port = server.start()
        logger.info("model %s: data port %d open", self._servable.config.name, port)
        return server

    def record_replica_metadata(self) -> dict[str, Any]:
        """Where this replica's data port is; Serve captures it once, after the constructor,
        and hands it to every handle's router with the replica set."""
        return {
            "model": self._servable.config.name,
            "host": self._host,
            "port": self._server.port,
            "pid": os.getpid(),
            "node": socket.gethostname(),
            # the requests one ingress sends it at once (``Router``): its data port's bound
            "max_in_flight": self._server.max_in_flight,
        }

    def _drain(self) -> None:
        """Before a swap's heavy work: let the requests running here finish (bounded). Their
        answers say ``busy``, so the ingresses send the next ones to other replicas."""
        deadline = time.monotonic() + DRAIN_BEFORE_SWAP_S
        while self._server.in_flight:
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)

    def _device_fault(self, message: str) -> None:
        """This process's CUDA context is gone (a sticky error): tell the node (under MPS it
        hit every client of the GPU's server; ``report_fault`` stays silent when a peer told
        the node first, as when this call comes from ``_peer_fault``), then exit at once
        rather than after three failed health checks: the server takes no new client until
        every client it hit has exited, so each second here delays the replacements."""
        self._mps.report_fault(message)
        threading.Thread(target=self._exit, args=(message,), name="fault-exit").start()

    def _peer_fault(self, fault: GpuFault) -> None:
        """Another client of this GPU's MPS server reported a fatal fault after this process
        started: this process's context is gone too, whether or not it has noticed yet."""
        self._servable.device_fault(
            f"GPU {fault.gpu} fault on MPS server {fault.server}, reported by pid "
            f"{fault.reporter}: {fault.message[:300]}"
        )

    def _exit(self, why: str) -> None:
        """Refuse new frames (``ReplicaUnavailable``: the ingresses set this replica aside and
        retry elsewhere at once), let the requests here get their answers, and end the
        process; Ray Serve sees the actor die, drops it from the replica set it pushes to
        the ingresses, and replaces it."""
        if not self._leaving.acquire(blocking=False):
            return
        self._server.refuse(f"the replica is exiting: {why[:200]}")
        self._drain()
        logger.error("model %s: exiting for a new process: %s", self._servable.config.name, why)
        logging.shutdown()
        os._exit(EXIT_DEVICE_FAULT)

    def handle_frame(self, header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        """One request from the ingress (runs on the data port's thread pool), counted in
        Serve's own request metrics for this deployment and replica (``metrics.SERVE_*``):
        Serve's handle path never sees it, and the Ray dashboard's Serve views read those."""
        op = header.get("op")
        error: BaseException | None = None
        try:
            return self._answer(op, header, body)
        except (MpsServeError, frame.FrameError) as exc:
            error = exc
            return frame.encode(frame.error_header(exc))
        except BaseException as exc:  # the data port answers it; counted here all the same
            error = exc
            raise
        finally:
            received = header.get("_received", 0.0)
            seconds = time.perf_counter() - received if received else 0.0
            metrics.observe_serve_request(self._serve_tags.route(op), seconds, error)

    def _answer(self, op: object, header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        if op == "infer":
            return self._infer(header, body)
        if op == "metadata":
            return frame.encode({"ok": True, "metadata": self.metadata()})
        raise frame.FrameError(f"unknown operation {op!r}")

    def _infer(self, header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        """One inference frame, timed in Triton's parts (``ingress.stats``)."""
        started = time.perf_counter_ns()
        received = int(header["_received"] * 1e9)
        try:
            inputs = frame.tensors(header, body)
            decoded = time.perf_counter_ns()
            version, outputs = self._servable.infer(
                inputs, header.get("outputs"), header.get("version")
            )
            inferred = time.perf_counter_ns()
            answer = {"ok": True, "version": version, "busy": self._servable.busy}
            parts = frame.encode(answer, outputs)
            encoded = time.perf_counter_ns()
        except Exception:
            served = self._servable.version
            self._stats.failed(str(served or ""), time.perf_counter_ns() - received)
            raise
        timing = Timing(
            started - received, decoded - started, inferred - decoded, encoded - inferred
        )
        self._stats.record(version, timing)
        metrics.observe_inference(
            self._servable.config.name,
            version,
            queue_seconds=(started - received) / 1e9,
            inference_seconds=(inferred - started) / 1e9,
        )
        return parts

    def stats(self) -> dict[str, Any]:
        """This replica's inference statistics per version and the version it serves
        (the ingress sums every replica's through Serve's ``broadcast``)."""
        served = self._servable.version
        return {
            "serving": None if served is None else str(served),
            "versions": self._stats.snapshot(),
        }

    def repository_state(self) -> dict[str, Any]:
        """The model repository's view of this replica (``Servable.repository_state``)
        and where it runs."""
        return {**self._servable.repository_state(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def infer(
        self,
        inputs: dict[str, Any],
        outputs: list[str] | None = None,
        version: str | None = None,
    ) -> tuple[str, dict[str, Any]] | MpsServeError:
        """The same inference through a Serve handle (tools and tests; not the data path).
        A client's error comes back as a value, not as a replica fault."""
        try:
            return self._servable.infer(inputs, outputs, version)
        except MpsServeError as exc:
            return exc

    def metadata(self) -> dict[str, Any]:
        """What ``mpsserve status`` shows (it asks every replica through Serve's
        ``broadcast``); also the ``metadata`` frame."""
        server = self._server
        return {
            **self._servable.metadata(),
            "mps": {**self._mps.describe(), "node": self._mps.node_state()},
            "pid": os.getpid(),
            "node": socket.gethostname(),
            "host": self._host,
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "data_port": server.port,
            "in_flight": {
                "now": server.in_flight,
                "peak": server.peak_in_flight,
                "limit": server.max_in_flight,
                "overloaded": server.overloaded,
            },
        }

    def ready(self) -> bool:
        return self._servable.ready

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose health check raises; refuse new frames first
        so the ingresses stop sending to it at once (Serve's long poll drops it from their
        replica set when Serve acts). A stalled inference thread fails the check but keeps
        serving: the ingresses already route around a replica that does not answer, and
        one that recovers before Serve acts serves on."""
        metrics.flush_counts()  # frames counted since the last one, when traffic stopped
        problem = self._servable.problem() or self._mps.problem()
        if problem is None and not self._server.alive:
            problem = "its data port stopped"
        if problem is not None:
            self._server.refuse(problem)
            raise RuntimeError(f"model {self._servable.config.name!r}: {problem}")
        stalled = self._stalled()
        if stalled is not None:
            logger.error("model %s: %s", self._servable.config.name, stalled)
            raise RuntimeError(f"model {self._servable.config.name!r}: {stalled}")

    def _stalled(self) -> str | None:
        """An inference call running past ``inference_stall_s`` (a hung runtime or GPU).
        Only handler calls count: a version loading or warming runs on the store watcher's
        thread, and requests queued for a thread are load, not a stall."""
        running_s = self._server.longest_running_s()
        if running_s <= self._stall_s:
            return None
        return (
            f"inference stalled: a request has run for {running_s:.0f}s "
            f"(placement.inference_stall_s is {self._stall_s:g})"
        )

    def __del__(self) -> None:
        """Serve's graceful shutdown: Serve took this replica out of the set it pushes to
        the ingresses before calling this; frames already on their way get
        ``ReplicaUnavailable`` (retried elsewhere), those running finish, then the port
        closes."""
        server = getattr(self, "_server", None)  # None when the constructor failed
        if server is not None:
            server.refuse("the replica is shutting down")
            server.stop()
        metrics.flush_counts()
        self._servable.shutdown()


DRAIN_BEFORE_SWAP_S = 0.5  # most a swap waits for the requests in flight here
EXIT_DEVICE_FAULT = 3  # the exit status of a replica that ends itself after a device fault
