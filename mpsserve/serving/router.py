"""The ingress's view of the model replicas: their data ports, how busy each is, and the
call that sends one frame to the least busy one.

Endpoints come from the ``Directory`` (each replica registers its data port once its model
is loaded and keeps the entry fresh). Each request goes to the replica with the fewest
requests in flight from this ingress, over a pooled connection. A replica that cannot be
reached (it died, Serve is replacing it) is set aside and the request goes to another one,
so a replica replacement or a redeploy costs no request: inference is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from mpsserve.errors import ModelNotReady
from mpsserve.protocol import frame
from mpsserve.types import InferRequest, InferResponse

logger = logging.getLogger(__name__)

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_FAILURES = (OSError, ConnectionError, asyncio.IncompleteReadError, frame.FrameError)


@dataclass
class Endpoint:
    """One replica's data port, as this ingress sees it."""

    key: str
    model: str
    host: str
    port: int
    pid: int = 0
    node: str = ""
    in_flight: int = 0
    idle: list[Connection] = field(default_factory=list)
    set_aside_until: float = 0.0

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> Endpoint:
        return cls(
            key=entry["key"],
            model=entry["model"],
            host=entry["host"],
            port=int(entry["port"]),
            pid=int(entry.get("pid", 0)),
            node=str(entry.get("node", "")),
        )

    def usable(self, now: float) -> bool:
        return now >= self.set_aside_until

    def close_idle(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class Router:
    """Routes frames to replicas; every method runs on the ingress's event loop."""

    def __init__(
        self,
        max_in_flight: dict[str, int],
        wait_for_replica_s: float = 15.0,
        set_aside_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        max_frame_bytes: int = 2**31,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.wait_for_replica_s = wait_for_replica_s
        self.set_aside_s = set_aside_s
        self.connect_timeout_s = connect_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self._endpoints: dict[str, Endpoint] = {}
        self._changed = asyncio.Event()

    # -- the directory's view ---------------------------------------------------------------

    def update(self, entries: list[dict[str, Any]]) -> None:
        """Replace the known endpoints with the directory's list (keeps live counters)."""
        fresh = {e["key"]: e for e in entries if e.get("kind", "model") == "model"}
        for key in list(self._endpoints):
            if key not in fresh:
                gone = self._endpoints.pop(key)
                gone.close_idle()
                logger.info("replica %s of %s left (%s:%d)", key, gone.model, gone.host, gone.port)
        for key, entry in fresh.items():
            if key not in self._endpoints:
                endpoint = Endpoint.from_entry(entry)
                self._endpoints[key] = endpoint
                logger.info(
                    "replica %s of %s joined (%s:%d)",
                    key,
                    endpoint.model,
                    endpoint.host,
                    endpoint.port,
                )
        self._wake()

    def endpoints(self, model: str | None = None) -> list[Endpoint]:
        return [e for e in self._endpoints.values() if model is None or e.model == model]

    def has_replica(self, model: str) -> bool:
        now = time.monotonic()
        return any(e.usable(now) for e in self.endpoints(model))

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- requests ---------------------------------------------------------------------------

    async def call(self, model: str, parts: list[frame.Buffer]) -> tuple[dict[str, Any], bytes]:
        """Send one frame to a replica of ``model``; returns the answer's header and body.
        Retries on another replica when one cannot be reached."""
        tried: set[str] = set()
        last: BaseException | None = None
        while True:
            endpoint = await self._acquire(model, tried, last)
            try:
                return await self._exchange(endpoint, parts)
            except _FAILURES as exc:
                last = exc
                tried.add(endpoint.key)
                endpoint.set_aside_until = time.monotonic() + self.set_aside_s
                endpoint.close_idle()
                logger.warning(
                    "replica %s of %s (%s:%d) failed a request (%s); trying another",
                    endpoint.key,
                    model,
                    endpoint.host,
                    endpoint.port,
                    exc or type(exc).__name__,
                )
            finally:
                self._release(endpoint)

    async def _acquire(self, model: str, tried: set[str], last: BaseException | None) -> Endpoint:
        limit = self.max_in_flight.get(model, 8)
        waited_since = time.monotonic()
        while True:
            now = time.monotonic()
            known = [e for e in self.endpoints(model) if e.key not in tried and e.usable(now)]
            free = [e for e in known if e.in_flight < limit]
            if free:
                least = min(e.in_flight for e in free)
                endpoint = random.choice([e for e in free if e.in_flight == least])
                endpoint.in_flight += 1
                return endpoint
            if not known and now - waited_since > self.wait_for_replica_s:
                reason = f"; the last one failed with {last!r}" if last is not None else ""
                raise ModelNotReady(
                    f"no replica of model {model!r} is reachable "
                    f"(waited {self.wait_for_replica_s:g}s){reason}"
                )
            changed = self._changed
            with contextlib.suppress(TimeoutError):  # a release or a new list frees one
                await asyncio.wait_for(changed.wait(), 0.5)

    def _release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self._wake()

    async def _exchange(
        self, endpoint: Endpoint, parts: list[frame.Buffer]
    ) -> tuple[dict[str, Any], bytes]:
        if endpoint.idle:
            reader, writer = endpoint.idle.pop()
        else:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.host, endpoint.port), self.connect_timeout_s
            )
        done = False
        try:
            writer.writelines(parts)
            await writer.drain()
            head, size = frame.read_prefix(
                await reader.readexactly(frame.PREFIX.size), self.max_frame_bytes
            )
            header = frame.decode_header(await reader.readexactly(head))
            body = await reader.readexactly(size) if size else b""
            done = True
        finally:
            if done and endpoint.key in self._endpoints:
                endpoint.idle.append((reader, writer))
            else:  # cancelled (deadline) or failed mid-exchange: the stream is unusable
                writer.close()
        return header, body


class ReplicaBackend:
    """A ``ModelBackend`` that sends frames to a model's replicas through the router."""

    def __init__(self, model: str, router: Router) -> None:
        self.model, self._router = model, router

    async def _call(
        self, header: dict[str, Any], tensors: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], bytes]:
        answer, body = await self._router.call(self.model, frame.encode(header, tensors))
        frame.raise_for_error(answer)
        return answer, body

    async def infer(self, request: InferRequest) -> InferResponse:
        header = {
            "op": "infer",
            "model": self.model,
            "version": request.version,
            "outputs": [o.name for o in request.outputs] if request.outputs else None,
        }
        answer, body = await self._call(header, request.inputs)
        outputs = frame.tensors(answer, body)
        return InferResponse(request.model, answer["version"], outputs, request.id)

    async def metadata(self) -> dict[str, Any]:
        answer, _ = await self._call({"op": "metadata"})
        metadata: dict[str, Any] = answer["metadata"]
        return metadata

    async def ready(self) -> bool:
        return self._router.has_replica(self.model)


def call_replica(host: str, port: int, header: dict[str, Any], timeout_s: float = 5.0) -> Any:
    """One frame to a replica's data port from blocking code (``mpsserve status``); returns
    the answer's header, or raises its error."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(b"".join(bytes(part) for part in frame.encode(header)))
        reader = sock.makefile("rb")
        head, size = frame.read_prefix(reader.read(frame.PREFIX.size), 2**30)
        answer = frame.decode_header(reader.read(head))
        reader.read(size)
    frame.raise_for_error(answer)
    return answer
