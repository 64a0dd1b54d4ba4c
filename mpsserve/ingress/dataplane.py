"""The transport-free core of the ingress (KServe's ``DataPlane``).

REST and gRPC call these methods and only translate wire formats; neither holds logic. What
runs a model is a ``backends.ModelBackend``: the model's replicas over the data port in
production (``ReplicaBackend``), a function in this process in tests (``MockBackend``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from mpsserve import __version__, metrics
from mpsserve.errors import (
    DeadlineExceeded,
    ModelNotFound,
    MpsServeError,
    Overloaded,
    PayloadTooLarge,
)
from mpsserve.ingress.backends import ModelBackend
from mpsserve.ingress.extensions import Extensions, ModelAdmin
from mpsserve.ingress.health import HealthBoard
from mpsserve.settings import settings
from mpsserve.text import log_field, new_request_id, quote, valid_request_id
from mpsserve.types import InferRequest, InferResponse

access_log = logging.getLogger("mpsserve.access")
logger = logging.getLogger(__name__)

EXTENSIONS = [
    "binary_tensor_data",
    "model_configuration",
    "statistics",
    "model_repository",
    "model_repository(unload_dependents)",
]
DTYPES_TTL_S = 10.0  # how long an input-dtype map read from a replica is reused
QUOTE = "'"  # model names are quoted as repr() quoted them


class RecentStats:
    """Requests answered in the last ``window_s`` seconds, for ``mpsserve status``."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._done: collections.deque[tuple[float, float, bool]] = collections.deque()

    def record(self, seconds: float, ok: bool) -> None:
        now = time.monotonic()
        self._done.append((now, seconds, ok))
        while self._done and now - self._done[0][0] > self.window_s:
            self._done.popleft()

    def snapshot(self) -> dict[str, float]:
        now = time.monotonic()
        recent = [(s, ok) for t, s, ok in self._done if now - t <= self.window_s]
        latencies = sorted(s for s, _ in recent)
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if recent else 0.0
        return {
            "window_s": self.window_s,
            "requests": len(recent),
            "requests_per_s": round(len(recent) / self.window_s, 2),
            "errors": sum(1 for _, ok in recent if not ok),
            "p99_ms": round(p99 * 1000, 2),
        }


#: What a client may read of a model's metadata: KServe v2's fields and the ragged inputs.
PUBLIC_METADATA = frozenset(
    {"name", "versions", "platform", "inputs", "outputs", "ragged_features"}
)


class DataPlane:
    def __init__(
        self,
        backends: Mapping[str, ModelBackend],
        max_request_bytes: int,
        request_timeout_s: float,
        max_in_flight: int = 2**31,
        admin: ModelAdmin | None = None,
        repository_api: bool = False,
    ) -> None:
        self._backends = backends
        self.max_request_bytes = max_request_bytes
        self._timeout_s = request_timeout_s
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._dtypes: dict[str, tuple[float, dict[str, str]]] = {}
        self.recent = RecentStats()
        #: Whether each model serves a version, as ``health`` last saw (absent: not known,
        #: taken as serving when it has a replica).
        self.serving: dict[str, bool] = {}
        self.health = HealthBoard(self)
        #: Triton's extensions: model configuration, statistics, the model repository.
        self.extensions = Extensions(self, self.health, admin, repository_api)

    @staticmethod
    def live() -> bool:
        return True

    async def ready(self) -> bool:
        """Ready when every model is: a load balancer should not send traffic before."""
        states = await asyncio.gather(*(b.ready() for b in self._backends.values()))
        return all(states)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "mpsserve", "version": __version__, "extensions": EXTENSIONS}

    def models(self) -> list[str]:
        return sorted(self._backends)

    def backend(self, name: str) -> ModelBackend:
        try:
            return self._backends[name]
        except KeyError:
            raise ModelNotFound(
                f"unknown model {quote(name, mark=QUOTE)}; this server serves {self.models()}"
            ) from None

    async def model_ready(self, name: str, version: str | None = None) -> bool:
        backend = self.backend(name)
        if version is None:
            return await backend.ready() and self.serving.get(name, True)
        return await backend.ready() and version in (await backend.metadata())["versions"]

    async def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The model's metadata as any client may read it: ``PUBLIC_METADATA`` only (a
        replica's own metadata also holds its pid, data port, store path and MPS state,
        which are for ``mpsserve status`` through Ray, not for the public ports)."""
        metadata = {
            k: v for k, v in (await self.backend(name).metadata()).items() if k in PUBLIC_METADATA
        }
        if version is not None and version not in metadata["versions"]:
            raise ModelNotFound(
                f"model {quote(name, mark=QUOTE)} version {quote(version, mark=QUOTE)} is not "
                f"served; serving {metadata['versions']}"
            )
        return metadata

    async def input_dtypes(self, name: str) -> dict[str, str]:
        """Input name -> numpy dtype, for wire formats that carry untyped JSON (TF Serving)."""
        cached = self._dtypes.get(name)
        if cached is not None and time.monotonic() - cached[0] < DTYPES_TTL_S:
            return cached[1]
        metadata = await self.model_metadata(name)
        dtypes = {spec["name"]: spec["dtype"] for spec in metadata["inputs"]}
        self._dtypes[name] = (time.monotonic(), dtypes)
        return dtypes

    def check_size(self, size: int) -> None:
        """Refuse a body over the limit before decoding it."""
        if size > self.max_request_bytes:
            raise PayloadTooLarge(
                f"request body is {size} bytes; the limit is {self.max_request_bytes} "
                "(ingress.max_request_mb)"
            )

    @contextmanager
    def admission(self, model: str, protocol: str, request_id: str | None = None) -> Iterator[None]:
        """Hold one of the ingress's ``max_in_flight`` places for a request, or refuse it
        at once: past the bound a request would only queue for a model replica, and a quick
        503 the client can retry beats a wait of many seconds (measured: P99 17.5 s at 200
        clients when nothing was shed). Taken before a body is read, so a shed request
        costs no buffer."""
        if self.in_flight >= self.max_in_flight:
            exc = Overloaded(
                f"the server holds its most requests in flight ({self.max_in_flight}); retry "
                "shortly (ingress.limits.max_in_flight_requests)"
            )
            self.rejected(model, protocol, request_id, exc, time.perf_counter())
            raise exc
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def infer(
        self, request: InferRequest, protocol: str = "http", request_id: str | None = None
    ) -> InferResponse:
        """Run one request; count it, time it and write its access-log line, whatever the
        outcome (``status`` is the HTTP status code for either protocol)."""
        started = time.perf_counter()
        status, version, rows = 500, request.version or "", request_rows(request)
        metrics.add_in_flight(request.model, 1)
        try:
            backend = self.backend(request.model)
            try:
                response = await asyncio.wait_for(backend.infer(request), self._timeout_s)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"model {request.model!r} did not answer within {self._timeout_s:g}s"
                ) from None
            status, version = 200, response.version
            return response
        except MpsServeError as exc:
            status = exc.http_status
            raise
        finally:
            metrics.add_in_flight(request.model, -1)
            self._account(
                request.model, version, protocol, status, rows, request_id or request.id, started
            )

    def rejected(
        self, model: str, protocol: str, request_id: str | None, exc: BaseException, started: float
    ) -> None:
        """Count and log a request refused before inference (malformed, unknown model, too
        large); an unknown model's name is not a label (clients choose it)."""
        status = exc.http_status if isinstance(exc, MpsServeError) else 500
        label = model if model in self._backends else "(unknown)"
        self._account(label, "", protocol, status, 0, request_id, started)

    def _account(
        self,
        model: str,
        version: str,
        protocol: str,
        status: int,
        rows: int,
        request_id: str | None,
        started: float,
    ) -> None:
        """Every answered request, once: metrics, the last-minute figures, the access log."""
        elapsed = time.perf_counter() - started
        metrics.observe_request(model, version, protocol, str(status), rows, elapsed)
        self.recent.record(elapsed, status < 500)
        log_access(request_id or "-", model, version, protocol, rows, status, elapsed)


def request_id_for(client_id: str | None, body_id: str | None) -> str:
    """The client's request id (header or gRPC metadata), else the body's ``id``, else a new
    one; echoed back to the client and written in the access log, so it must be safe in a
    header, gRPC metadata and a log line (``client_request_id``)."""
    return client_request_id(client_id or body_id) or new_request_id()


def client_request_id(given: str | None) -> str | None:
    """``given`` when it is 1-128 visible ASCII characters; None when absent; else a new id,
    logged with an escaped prefix of what was sent (a CR/LF in an id would split the
    response's header, break gRPC metadata and forge access-log lines)."""
    if not given or valid_request_id(given):
        return given or None
    replacement = new_request_id()
    logger.warning(
        "request id replaced by %s: the client sent %s (%d characters), not 1-128 visible "
        "ASCII characters",
        replacement,
        quote(given, 32),
        len(given),
    )
    return replacement


def request_rows(request: InferRequest) -> int:
    """Rows of a request: the smallest leading dimension among its inputs (a ragged
    feature's values are longer than its lengths, which count the rows)."""
    leads = [a.shape[0] for a in request.inputs.values() if a.ndim]
    return min(leads) if leads else 1


def log_access(
    request_id: str,
    model: str,
    version: str,
    protocol: str,
    rows: int,
    status: int,
    seconds: float,
) -> None:
    """One line per request (``MPSSERVE_ACCESS_LOG``: text, json or off). Fields a client
    chose are escaped (JSON escapes them itself): one request is one line."""
    style = settings().access_log
    if style == "off" or not access_log.isEnabledFor(logging.INFO):
        return
    ms = round(seconds * 1000, 2)
    if style == "json":
        access_log.info(
            json.dumps(
                {
                    "request_id": request_id,
                    "model": model,
                    "version": version,
                    "protocol": protocol,
                    "rows": rows,
                    "status": status,
                    "latency_ms": ms,
                }
            )
        )
    else:
        access_log.info(
            "request_id=%s model=%s version=%s protocol=%s rows=%d status=%d latency_ms=%.2f",
            log_field(request_id),
            log_field(model),
            log_field(version or "-"),
            protocol,
            rows,
            status,
            ms,
        )
