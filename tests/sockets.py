"""Socket helpers shared by the transport tests of both tiers."""

from __future__ import annotations

import socket
import time


def closed_after(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """What the peer received until the replica closed the connection, and how long it took
    (fails if it stays open past ``timeout_s``)."""
    sock.settimeout(timeout_s)
    started, received = time.monotonic(), b""
    with sock:
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received, time.monotonic() - started
