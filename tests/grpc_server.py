"""An ingress gRPC server (``ingress.grpc.start_grpc_server``) on its own event loop in a
thread, for unit tests that call it with real gRPC stubs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

from mpsserve.ingress.dataplane import DataPlane
from mpsserve.ingress.grpc import GrpcLimits, start_grpc_server


@contextlib.contextmanager
def grpc_server_thread(plane: DataPlane, limits: GrpcLimits) -> Iterator[int]:
    """Serve ``plane`` on a free loopback port (yielded) until the block ends."""
    loop = asyncio.new_event_loop()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = loop.run_until_complete(start_grpc_server(plane, "127.0.0.1", port, limits))
    thread = threading.Thread(target=loop.run_forever)
    thread.start()

    async def stop() -> None:
        plane.health.stop()  # the task start_grpc_server started, as the ingress stops it
        await server.stop(0)

    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
