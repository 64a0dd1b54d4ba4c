"""The data port against hostile peers, on loopback, without Ray: a real ``ReplicaServer``;
raw sockets play the peers that do not hold the key, claim sizes they never send, or sit."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from mpsserve.errors import PayloadTooLarge
from mpsserve.ingress import transport
from mpsserve.ingress.backends import ReplicaBackend
from mpsserve.ingress.dataplane import DataPlane
from mpsserve.ingress.replica_server import ReplicaServer
from mpsserve.ingress.router import Router, call_replica
from mpsserve.ingress.transport import KeyWatcher, WireLimits
from mpsserve.protocol import frame, handshake
from mpsserve.protocol.handshake import HandshakeError, Keyring
from mpsserve.types import InferRequest
from tests.sockets import closed_after

LIMITS = WireLimits(
    max_header_bytes=1024,
    max_request_bytes=64 * 2**20,
    max_response_bytes=2**20,
    handshake_timeout_s=0.5,
    idle_timeout_s=1.0,
    read_timeout_s=0.5,
    max_connections=4,
)
RING = Keyring.generate()


class Replica:
    """A data port whose handler counts what it served (nothing, for a peer without the key)."""

    def __init__(self, ring: Keyring = RING, limits: WireLimits = LIMITS) -> None:
        self.ring, self.served = ring, 0
        self.server = ReplicaServer(
            self.handle, threads=2, keys=lambda: self.ring, host="127.0.0.1", limits=limits
        )
        self.port = self.server.start()

    def handle(self, header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        self.served += 1
        if header.get("op") == "big":
            return frame.encode({"ok": True}, {"x": np.zeros(2**20 + 1, np.uint8)})
        return frame.encode({"ok": True, "metadata": {"pid": 1, "store": "/secret/path"}})


@pytest.fixture
def replica() -> Iterator[Replica]:
    started = Replica()
    yield started
    started.server.stop(grace_s=1)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    return sock


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def authenticated(port: int, ring: Keyring = RING) -> socket.socket:
    sock = connect(port)
    sock.sendall(handshake.answer(ring, read_exactly(sock, handshake.CHALLENGE.size)))
    assert read_exactly(sock, len(handshake.ACCEPTED)) == handshake.ACCEPTED
    return sock


def metadata_frame() -> bytes:
    return b"".join(bytes(p) for p in frame.encode({"op": "metadata"}))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_the_right_key_is_served(replica: Replica) -> None:
    answer = call_replica("127.0.0.1", replica.port, {"op": "metadata"}, RING)
    assert answer["ok"] and replica.served == 1


def test_a_wrong_secret_gets_a_closed_connection_and_nothing_else(replica: Replica) -> None:
    forged = Keyring(((RING.ids()[0], b"x" * handshake.SECRET_BYTES),))  # right id, wrong key
    sock = connect(replica.port)
    challenge = read_exactly(sock, handshake.CHALLENGE.size)
    sock.sendall(handshake.answer(forged, challenge) + metadata_frame())
    received, _ = closed_after(sock, 5)
    assert received == b"" and replica.served == 0


def test_a_client_without_a_shared_key_refuses_before_sending_anything(replica: Replica) -> None:
    with pytest.raises(HandshakeError, match="accepts none of this process's transport keys"):
        call_replica("127.0.0.1", replica.port, {"op": "metadata"}, Keyring.generate())
    assert replica.served == 0


def test_frames_without_a_handshake_are_never_read(replica: Replica) -> None:
    sock = connect(replica.port)
    read_exactly(sock, handshake.CHALLENGE.size)
    sock.sendall(metadata_frame() * 4)  # a frame where the answer belongs: a failed proof
    received, _ = closed_after(sock, 5)
    assert received == b"" and replica.served == 0


def test_no_handshake_is_closed_after_the_timeout(replica: Replica) -> None:
    sock = connect(replica.port)
    read_exactly(sock, handshake.CHALLENGE.size)
    sock.sendall(frame.PREFIX.pack(frame.MAGIC, 2**31, 0))  # 12 bytes, then silence
    received, waited = closed_after(sock, 5)
    assert received == b"" and replica.served == 0
    assert LIMITS.handshake_timeout_s - 0.1 <= waited <= LIMITS.handshake_timeout_s + 1.0


def test_claimed_sizes_allocate_nothing(replica: Replica) -> None:
    """Four peers without the key claim a 2 GiB header; an authenticated one claims a 64 MiB
    body and sends 10 bytes of it: the process grows by less than the first body chunk."""
    before = rss_bytes()
    liars = [connect(replica.port) for _ in range(3)]
    for sock in liars:
        read_exactly(sock, handshake.CHALLENGE.size)
        sock.sendall(frame.PREFIX.pack(frame.MAGIC, 2**31 - 1, 0))
    slow = authenticated(replica.port)
    head = b'{"op":"metadata"}'
    slow.sendall(frame.PREFIX.pack(frame.MAGIC, len(head), LIMITS.max_request_bytes) + head)
    slow.sendall(b"x" * 10)
    time.sleep(0.2)
    grown = rss_bytes() - before
    assert grown < transport.FIRST_BODY_CHUNK + 2 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB"
    for sock in [*liars, slow]:
        assert closed_after(sock, 5)[0] == b""  # the handshake and read timeouts end them
    assert replica.served == 0


def test_an_authenticated_peer_claiming_a_huge_header_is_closed_at_once(replica: Replica) -> None:
    sock = authenticated(replica.port)
    before = rss_bytes()
    sock.sendall(frame.PREFIX.pack(frame.MAGIC, 2**31, 0))
    received, waited = closed_after(sock, 5)
    assert received == b"" and waited < 0.4 and replica.served == 0
    assert rss_bytes() - before < 2 * 2**20


def test_an_oversized_body_is_closed_unread(replica: Replica) -> None:
    sock = authenticated(replica.port)
    head = b'{"op":"metadata"}'
    sock.sendall(frame.PREFIX.pack(frame.MAGIC, len(head), LIMITS.max_request_bytes + 1) + head)
    received, waited = closed_after(sock, 5)
    assert received == b"" and waited < 0.4 and replica.served == 0


def test_a_large_body_arriving_in_pieces_is_served_whole(replica: Replica) -> None:
    """Bodies past the first chunk grow as bytes come; the tensor arrives intact."""
    payload = np.arange(3 * 2**20, dtype=np.int32)  # 12 MiB: the buffer grows twice
    seen: list[int] = []

    def handle(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        got = frame.tensors(header, body)["x"]
        seen.append(int((got == payload).all()))
        return frame.encode({"ok": True})

    replica.server.handler = handle
    sock = authenticated(replica.port)
    for part in frame.encode({"op": "infer"}, {"x": payload}):
        sock.sendall(bytes(part))
    head, _ = frame.read_prefix(read_exactly(sock, frame.PREFIX.size), 2**20, 2**20)
    assert frame.decode_header(read_exactly(sock, head))["ok"] and seen == [1]


def test_idle_and_stalled_connections_are_closed(replica: Replica) -> None:
    idle, stalled = authenticated(replica.port), authenticated(replica.port)
    started = time.monotonic()
    stalled.sendall(frame.PREFIX.pack(frame.MAGIC, 100, 0) + b'{"op":')  # then nothing
    closed_after(stalled, 5)
    stalled_after = time.monotonic() - started
    closed_after(idle, 5)
    idle_after = time.monotonic() - started
    assert LIMITS.read_timeout_s - 0.1 <= stalled_after <= LIMITS.read_timeout_s + 1.0
    assert LIMITS.idle_timeout_s - 0.1 <= idle_after <= LIMITS.idle_timeout_s + 1.0


def test_connections_over_the_cap_are_closed_at_once(replica: Replica) -> None:
    held = [authenticated(replica.port) for _ in range(LIMITS.max_connections)]
    extra = connect(replica.port)
    received, waited = closed_after(extra, 5)
    assert received == b"" and waited < 0.5  # not even a challenge
    held.pop().close()
    time.sleep(0.1)
    assert call_replica("127.0.0.1", replica.port, {"op": "metadata"}, RING)["ok"]


def test_rotation_accepts_the_previous_key_both_ways() -> None:
    old = Keyring.generate()
    new = old.rotated()
    assert new.ids()[1:] == old.ids() and len(new.rotated().keys) == handshake.KEPT
    for server_ring, client_ring in [(new, old), (old, new), (new, new)]:
        replica = Replica(server_ring)
        try:
            assert call_replica("127.0.0.1", replica.port, {"op": "m"}, client_ring)["ok"]
        finally:
            replica.server.stop(grace_s=1)
    replica = Replica(new.rotated())  # two rotations on: the oldest key no longer opens it
    try:
        with pytest.raises(HandshakeError):
            call_replica("127.0.0.1", replica.port, {"op": "m"}, old)
    finally:
        replica.server.stop(grace_s=1)


def test_an_answer_over_the_response_limit_becomes_an_error(replica: Replica) -> None:
    with pytest.raises(PayloadTooLarge, match=r"over transport\.max_response_mb"):
        call_replica("127.0.0.1", replica.port, {"op": "big"}, RING)


def test_the_keyring_never_shows_a_secret() -> None:
    ring = Keyring.generate().rotated()
    secrets = [secret for _, secret in ring.keys]
    for text in (repr(ring), str(ring), f"{ring}", repr([ring])):
        assert text == "Keyring(2 keys)" or "Keyring(2 keys)" in text
        assert not any(s.hex() in text or repr(s) in text for s in secrets)
    assert Keyring.load(ring.dump()) == ring


def test_the_router_authenticates_pools_and_retires_before_the_idle_timeout(
    replica: Replica,
) -> None:
    async def run() -> None:
        router = Router({"rec": 4}, keys=lambda: RING, limits=LIMITS)
        router.update(
            "rec", [{"key": "r", "model": "rec", "host": "127.0.0.1", "port": replica.port}]
        )
        for _ in range(3):
            await router.call("rec", frame.encode({"op": "metadata"}))
        await asyncio.sleep(LIMITS.idle_timeout_s + 0.6)  # the replica closed the pooled one
        await router.call("rec", frame.encode({"op": "metadata"}))
        assert router.endpoints()[0].set_aside_until == 0.0  # no failed attempt on the way
        backend = ReplicaBackend("rec", router)
        big = {"x": np.zeros(LIMITS.max_request_bytes // 8 + 1, np.int64)}
        with pytest.raises(PayloadTooLarge, match=r"ingress\.max_request_mb"):
            await backend.infer(InferRequest("rec", big))

    asyncio.run(run())
    assert replica.served == 4


def test_public_metadata_has_no_pid_port_or_path() -> None:
    class Backend:
        async def metadata(self) -> dict[str, Any]:
            return {
                "name": "rec",
                "versions": ["1"],
                "platform": "tensorflow",
                "inputs": [],
                "outputs": [],
                "pid": 4242,
                "data_port": 40001,
                "store": {"uri": "/models/rec"},
                "mps": {"pipe_dir": "/tmp/mpsserve/mps-pipe"},
            }

    plane = DataPlane({"rec": Backend()}, max_request_bytes=2**20, request_timeout_s=1)  # type: ignore[dict-item]
    metadata = asyncio.run(plane.model_metadata("rec"))
    assert set(metadata) == {"name", "versions", "platform", "inputs", "outputs"}


def test_keys_rotate_at_each_build_and_replicas_pick_them_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.experimental import internal_kv

    store: dict[tuple[bytes, str | None], bytes] = {}

    def put(key: bytes, value: bytes, overwrite: bool = True, namespace: str | None = None) -> int:
        store[key, namespace] = value
        return 1

    monkeypatch.setattr(internal_kv, "_internal_kv_put", put)
    monkeypatch.setattr(
        internal_kv, "_internal_kv_get", lambda key, namespace=None: store.get((key, namespace))
    )
    monkeypatch.setattr(transport, "REFRESH_S", 0.05)
    first = transport.rotate("app")
    watcher = KeyWatcher("app")
    watcher.start()
    try:
        second = transport.rotate("app")
        assert second.ids()[1] == first.ids()[0]
        deadline = time.monotonic() + 5
        while watcher.get() != second:
            assert time.monotonic() < deadline, "the watcher did not reload the keyring"
            time.sleep(0.02)
    finally:
        watcher.stop()
    with pytest.raises(Exception, match="no transport key"):
        transport.load("another-app")


def test_a_client_answer_is_bound_to_its_nonce() -> None:
    nonce, challenge = handshake.challenge(RING)
    answer = handshake.answer(RING, challenge)
    assert handshake.verify(RING, nonce, answer)
    assert not handshake.verify(RING, b"\0" * handshake.NONCE_BYTES, answer)  # a replay
    assert not handshake.verify(Keyring.generate(), nonce, answer)


def test_many_concurrent_good_clients_are_served(replica: Replica) -> None:
    """Within the cap, every authenticated connection is served (threads, real sockets)."""
    errors: list[BaseException] = []

    def one() -> None:
        try:
            for _ in range(5):
                call_replica("127.0.0.1", replica.port, {"op": "metadata"}, RING)
        except BaseException as exc:
            errors.append(exc)

    clients = LIMITS.max_connections // 2  # room for connections closing as others open
    threads = [threading.Thread(target=one) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == [] and replica.served == 5 * clients
