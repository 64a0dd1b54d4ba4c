"""A model replica's data port: frames in, frames out, over TCP, beside Ray Serve.

Ray Serve places, health-checks and replaces the replica; requests do not go through Serve's
proxy and handle (a Python hop, pickling and the object store for every 1 MB request), but
come straight from the ingress over a persistent connection. The server runs its own event
loop on a thread of the replica process; each frame is received straight into one buffer
(the tensors are views on it), and the handler runs on a small thread pool so the loop keeps
reading while the GPU works. One request at a time per connection; the ingress opens one
connection per request it has in flight to this replica.

The port assumes hostile peers: it binds the node's address (not 0.0.0.0), a peer must prove
it holds the application's key (``protocol.handshake``) within ``handshake_timeout_s`` before
a frame is read, frames are bounded (``WireLimits``: header, request body, answer), a body is
allocated as it arrives, connections are capped and closed when idle or stalled mid-frame,
and refusals are logged as counts, never one line per peer. How long the oldest handler call
has run (``longest_running_s``) is what the replica's health check reads to tell a hung
inference thread from a busy one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from mpsserve.errors import Overloaded, PayloadTooLarge, ReplicaUnavailable
from mpsserve.ingress.transport import FIRST_BODY_CHUNK, WireLimits
from mpsserve.protocol import frame, handshake
from mpsserve.protocol.handshake import Keyring

logger = logging.getLogger(__name__)

#: handler(header, body) -> response frame buffers; runs on the server's thread pool.
Handler = Callable[[dict[str, Any], bytearray], list[frame.Buffer]]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (Ray Serve's uvicorn brings it), else asyncio's."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop ships with ray[serve]
        return asyncio.new_event_loop()


class _Connection(asyncio.BufferedProtocol):
    """One peer: the handshake, then frames received into buffers, the handler, the answer.

    Stages: ``auth`` (a fixed-size answer to the challenge, nothing else is read), then per
    frame ``prefix`` -> ``header`` -> ``body``. Before the proof the connection holds a
    ``handshake.ANSWER``-sized buffer; after it, sizes are checked against the limits
    before anything is allocated, and a body grows as its bytes arrive (``FIRST_BODY_CHUNK``
    first), so a peer that claims more than it sends holds little."""

    def __init__(self, server: ReplicaServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._ring: Keyring | None = None
        self._nonce = b""
        self.running = False
        self.accepted_at = time.monotonic()
        self.last = self.accepted_at  # when bytes last arrived (or the last answer left)
        self._stage = "auth"
        self._buffer = bytearray(handshake.ANSWER.size)
        self._filled = 0
        self._header: dict[str, Any] = {}
        self._body_size = 0

    def _next_frame(self) -> None:
        self._stage = "prefix"
        self._buffer = bytearray(frame.PREFIX.size)
        self._filled = 0
        self._header = {}
        self._body_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if len(self._server.connections) >= self._server.limits.max_connections:
            self._server.refused("over the connection cap", transport)
            self._transport.abort()
            return
        self._server.connections.add(self)
        self._ring = self._server.keys()
        self._nonce, message = handshake.challenge(self._ring)
        self._transport.write(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        self.last = time.monotonic()
        if self._filled < len(self._buffer):
            return
        try:
            self._advance()
        except frame.FrameError as exc:
            self._server.refused(str(exc), self._transport)
            self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # nothing more is sent to a peer that broke the rules

    def timed_out(self, now: float) -> str | None:
        """Why this connection is past its time, or None (never while a request runs)."""
        limits = self._server.limits
        if self.running:
            return None
        if self._stage == "auth":
            late = now - self.accepted_at > limits.handshake_timeout_s
            return "no handshake in time" if late else None
        if self._stage == "prefix" and self._filled == 0:
            return "idle" if now - self.last > limits.idle_timeout_s else None
        return "stalled inside a frame" if now - self.last > limits.read_timeout_s else None

    def _advance(self) -> None:
        if self._stage == "auth":
            self._authenticate()
            return
        limits = self._server.limits
        if self._stage == "prefix":
            head, self._body_size = frame.read_prefix(
                bytes(self._buffer), limits.max_header_bytes, limits.max_request_bytes
            )
            self._stage, self._buffer, self._filled = "header", bytearray(head), 0
            if head:
                return
        if self._stage == "header":
            self._header = frame.decode_header(self._buffer)
            first = min(self._body_size, FIRST_BODY_CHUNK)
            self._stage, self._buffer, self._filled = "body", bytearray(first), 0
            if self._body_size:
                return
        if self._filled < self._body_size:
            self._grow()
            return
        self._dispatch()

    def _authenticate(self) -> None:
        assert self._ring is not None and self._transport is not None
        if not handshake.verify(self._ring, self._nonce, bytes(self._buffer)):
            raise handshake.HandshakeError("a peer failed the handshake")
        self._transport.write(handshake.ACCEPTED)
        self._next_frame()

    def _grow(self) -> None:
        """Room for more of the body, once what was allocated is full: doubling, never past
        the size the header declared (a new buffer: the loop may still hold a view on the
        old one, which a bytearray refuses to resize under)."""
        grown = bytearray(min(self._body_size, 2 * len(self._buffer)))
        grown[: self._filled] = self._buffer
        self._buffer = grown

    def _dispatch(self) -> None:
        assert self._transport is not None
        self._transport.pause_reading()
        self.running = True
        header, body = self._header, self._buffer
        self._next_frame()
        task = asyncio.ensure_future(self._server.run(header, body))
        task.add_done_callback(self._reply)

    def _reply(self, task: asyncio.Future[list[frame.Buffer]]) -> None:
        self.running, self.last = False, time.monotonic()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.writelines(task.result())
        transport.resume_reading()


class ReplicaServer:
    """Serves ``handler`` on ``host``:(a free port) from a thread with its own event loop, to
    peers that prove they hold a key of ``keys()`` (see ``protocol.handshake``)."""

    def __init__(
        self,
        handler: Handler,
        threads: int,
        *,
        keys: Callable[[], Keyring],
        host: str,
        limits: WireLimits | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.handler, self.host, self.keys = handler, host, keys
        self.limits = limits or WireLimits()
        self.max_in_flight = max_in_flight
        self.peak_in_flight = 0
        self.overloaded = 0  # frames answered "full" since start
        self._leaving: str | None = None  # why new frames are refused, once leaving
        self.connections: set[_Connection] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="infer")
        self._loop = new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="replica-server")
        self._thread.daemon = True
        self.port = 0
        self.in_flight = 0
        self._running: dict[int, float] = {}  # pool thread -> when its handler call began
        self._running_lock = threading.Lock()
        self._refusals = _Refusals()

    def start(self) -> int:
        """Bind and start serving; returns the port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]

        async def serve() -> None:
            self._server = await self._loop.create_server(
                lambda: _Connection(self), sock=sock, backlog=1024
            )
            self._loop.call_later(SWEEP_S, self._sweep)

        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout=10)
        return self.port

    def _sweep(self) -> None:
        """Close connections past their timeouts (runs every ``SWEEP_S`` on the loop)."""
        now = time.monotonic()
        for connection in list(self.connections):
            reason = connection.timed_out(now)
            if reason is not None:
                self.refused(reason, connection._transport)
                connection.close()
        self._loop.call_later(SWEEP_S, self._sweep)

    def refused(self, reason: str, transport: asyncio.BaseTransport | None) -> None:
        peer = transport.get_extra_info("peername") if transport is not None else None
        self._refusals.note(reason, peer)

    def refuse(self, why: str) -> None:
        """Answer every frame from now on with ``ReplicaUnavailable`` (the ingress retries
        it on another replica and sets this one aside)."""
        self._leaving = why

    def _refusal(self) -> list[frame.Buffer] | None:
        """The answer to a frame that must not run now (leaving, or full), else None.
        Runs on the loop, so the check and the count that follows are one step."""
        if self._leaving is not None:
            return frame.encode(frame.error_header(ReplicaUnavailable(self._leaving)))
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            self.overloaded += 1
            error = Overloaded(f"the replica has {self.in_flight} requests in flight")
            return frame.encode({**frame.error_header(error), "full": True})
        return None

    async def run(self, header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        """Run the handler off the loop; a handler crash becomes an error frame."""
        refusal = self._refusal()
        if refusal is not None:
            return refusal
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        received = time.perf_counter()
        header["_received"] = received
        try:
            parts = await self._loop.run_in_executor(self._pool, self._timed, header, body)
            return (
                parts
                if frame.body_size(parts) <= self.limits.max_response_bytes
                else _too_big(parts)
            )
        except Exception as exc:
            logger.exception("replica handler failed")
            return frame.encode(frame.error_header(exc))
        finally:
            self.in_flight -= 1

    def _timed(self, header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        """The handler, noted as running on this thread while it runs."""
        thread = threading.get_ident()
        with self._running_lock:
            self._running[thread] = time.monotonic()
        try:
            return self.handler(header, body)
        finally:
            with self._running_lock:
                del self._running[thread]

    def longest_running_s(self) -> float:
        """How long the oldest handler call still running has run (0 when none runs).
        Requests waiting for a thread do not count: a queue is load, not a stall."""
        with self._running_lock:
            oldest = min(self._running.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace_s``), then close."""
        if not self._thread.is_alive():
            return

        async def drain() -> None:
            if self._server is not None:
                self._server.close()
            deadline = time.monotonic() + grace_s
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for connection in list(self.connections):
                if connection._transport is not None:
                    connection._transport.close()

        try:
            asyncio.run_coroutine_threadsafe(drain(), self._loop).result(timeout=grace_s + 5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._pool.shutdown(wait=False)


SWEEP_S = 0.5  # how often timeouts are checked: each is late by at most this much
REFUSALS_LOG_S = 10.0  # refused connections are logged at most this often (an attacker's flood)


def _too_big(parts: list[frame.Buffer]) -> list[frame.Buffer]:
    error = PayloadTooLarge(
        f"the answer is {frame.body_size(parts)} bytes, over transport.max_response_mb"
    )
    return frame.encode(frame.error_header(error))


class _Refusals:
    """Refused and dropped connections, logged as a count at most every ``REFUSALS_LOG_S``:
    one line per refusal would let a peer fill the log."""

    def __init__(self) -> None:
        self._count, self._logged_at = 0, -REFUSALS_LOG_S

    def note(self, reason: str, peer: object) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._logged_at < REFUSALS_LOG_S:
            return
        logger.warning(
            "data port: closed %d connection(s) in the last %.0fs; the latest from %s: %s",
            self._count,
            min(now - self._logged_at, REFUSALS_LOG_S),
            peer,
            reason,
        )
        self._count, self._logged_at = 0, now
