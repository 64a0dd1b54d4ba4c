"""A model replica's data port: frames in, frames out, over TCP, beside Ray Serve.

Ray Serve places, health-checks and replaces the replica; requests do not go through Serve's
proxy and handle (a Python hop, pickling and the object store for every 1 MB request), but
come straight from the ingress over a persistent connection. The server runs its own event
loop on a thread of the replica process; each frame is received straight into one buffer
(the tensors are views on it), and the handler runs on a small thread pool so the loop keeps
reading while the GPU works. One request at a time per connection; the ingress opens one
connection per request it has in flight to this replica. How long the oldest handler call
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

from mpsserve.protocol import frame

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
    """Reads one frame into preallocated buffers, runs the handler, writes the answer."""

    def __init__(self, server: ReplicaServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self._stage = "prefix"
        self._buffer = bytearray(frame.PREFIX.size)
        self._filled = 0
        self._header: dict[str, Any] = {}
        self._body_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < len(self._buffer):
            return
        try:
            self._advance()
        except frame.FrameError as exc:
            logger.warning("dropping a connection: %s", exc)
            assert self._transport is not None
            self._transport.close()

    def _advance(self) -> None:
        if self._stage == "prefix":
            head, self._body_size = frame.read_prefix(bytes(self._buffer), self._server.max_bytes)
            self._stage, self._buffer, self._filled = "header", bytearray(head), 0
            if head:
                return
        if self._stage == "header":
            self._header = frame.decode_header(self._buffer)
            self._stage, self._buffer, self._filled = "body", bytearray(self._body_size), 0
            if self._body_size:
                return
        assert self._transport is not None
        self._transport.pause_reading()
        header, body = self._header, self._buffer
        self._reset()
        task = asyncio.ensure_future(self._server.run(header, body))
        task.add_done_callback(self._reply)

    def _reply(self, task: asyncio.Future[list[frame.Buffer]]) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.writelines(task.result())
        transport.resume_reading()


class ReplicaServer:
    """Serves ``handler`` on ``host``:(a free port) from a thread with its own event loop."""

    def __init__(
        self, handler: Handler, threads: int, host: str = "0.0.0.0", max_bytes: int = 2**31
    ) -> None:
        self.handler, self.host, self.max_bytes = handler, host, max_bytes
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

    def start(self) -> int:
        """Bind and start serving; returns the port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]

        async def serve() -> None:
            self._server = await self._loop.create_server(
                lambda: _Connection(self), sock=sock, backlog=1024
            )

        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout=10)
        return self.port

    async def run(self, header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        """Run the handler off the loop; a handler crash becomes an error frame."""
        self.in_flight += 1
        received = time.perf_counter()
        header["_received"] = received
        try:
            return await self._loop.run_in_executor(self._pool, self._timed, header, body)
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
