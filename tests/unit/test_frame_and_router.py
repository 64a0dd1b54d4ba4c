"""The ingress-to-replica path without Ray: frames, a real data port on loopback, routing."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from mpsserve.errors import InvalidInput, ModelNotReady
from mpsserve.protocol import frame
from mpsserve.serving.replica_server import ReplicaServer
from mpsserve.serving.router import ReplicaBackend, Router, call_replica
from mpsserve.types import InferRequest


def _decode(parts: list[frame.Buffer]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    raw = b"".join(bytes(p) for p in parts)
    head, size = frame.read_prefix(raw[: frame.PREFIX.size], 2**30)
    header = frame.decode_header(raw[frame.PREFIX.size : frame.PREFIX.size + head])
    body = bytearray(raw[frame.PREFIX.size + head :])
    assert len(body) == size
    return header, frame.tensors(header, body)


def test_frame_round_trip_keeps_names_dtypes_shapes_and_values() -> None:
    tensors = {
        "dense": np.arange(26, dtype=np.float32).reshape(2, 13),
        "ids": np.array([[1, -2]], dtype=np.int64),
        "lengths": np.array([3], dtype=np.int32),
    }
    header, got = _decode(frame.encode({"op": "infer", "model": "rec"}, tensors))
    assert header["op"] == "infer" and header["model"] == "rec"
    for name, array in tensors.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        np.testing.assert_array_equal(got[name], array)
        assert got[name].flags.writeable  # views on a bytearray: torch takes them as they are


def test_frame_refuses_what_is_not_a_frame() -> None:
    with pytest.raises(frame.FrameError, match="not an mpsserve frame"):
        frame.read_prefix(b"GET / HTTP/1.1"[: frame.PREFIX.size], 100)
    with pytest.raises(frame.FrameError, match="ended inside a frame"):
        frame.read_prefix(b"MPS1", 100)
    with pytest.raises(frame.FrameError, match="over the 10-byte limit"):
        frame.read_prefix(frame.PREFIX.pack(frame.MAGIC, 8, 8), 10)
    header = {"tensors": [["x", "FP32", [2], 8]]}
    with pytest.raises(frame.FrameError, match="its tensors take 8"):
        frame.tensors(header, bytearray(12))


def test_errors_travel_by_class_and_message() -> None:
    header = frame.error_header(InvalidInput("input 'dense' has 3 columns"))
    assert header["status"] == 400
    with pytest.raises(InvalidInput, match="input 'dense' has 3 columns"):
        frame.raise_for_error(header)
    with pytest.raises(Exception, match="internal error"):  # no internals from a crash
        frame.raise_for_error(frame.error_header(KeyError("secret")))


def echo(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
    """A replica handler: doubles every tensor, says which port answered."""
    if header.get("op") == "boom":
        raise RuntimeError("handler crashed")
    if header.get("op") == "bad":
        return frame.encode(frame.error_header(InvalidInput("bad tensor 'x'")))
    doubled = {name: array * 2 for name, array in frame.tensors(header, body).items()}
    return frame.encode({"ok": True, "version": "1", "port": header.get("port")}, doubled)


@pytest.fixture
def servers() -> Iterator[list[ReplicaServer]]:
    started = [ReplicaServer(echo, threads=2, host="127.0.0.1") for _ in range(2)]
    for server in started:
        server.start()
    yield started
    for server in started:
        server.stop(grace_s=1)


def entry(port: int, key: str | None = None) -> dict[str, Any]:
    return {"key": key or f"r{port}", "model": "rec", "host": "127.0.0.1", "port": port}


def test_data_port_answers_frames_and_survives_a_handler_crash(
    servers: list[ReplicaServer],
) -> None:
    port = servers[0].port
    with pytest.raises(Exception, match="internal error"):
        call_replica("127.0.0.1", port, {"op": "boom"})
    with pytest.raises(InvalidInput, match="bad tensor"):
        call_replica("127.0.0.1", port, {"op": "bad"})
    assert call_replica("127.0.0.1", port, {"op": "ping"})["ok"]


def test_backend_spreads_requests_and_retries_on_a_dead_replica(
    servers: list[ReplicaServer],
) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there: a replica that died

    async def scenario() -> tuple[int, list[np.ndarray]]:
        router = Router({"rec": 4}, wait_for_replica_s=1.0, set_aside_s=30)
        router.update([entry(s.port) for s in servers] + [entry(dead_port, "dead")])
        backend = ReplicaBackend("rec", router)
        x = np.arange(6, dtype=np.float32)
        request = InferRequest(model="rec", inputs={"x": x})
        results = await asyncio.gather(*(backend.infer(request) for _ in range(40)))
        dead_entry = next(e for e in router.endpoints("rec") if e.key == "dead")
        used = sum(bool(e.idle) for e in router.endpoints("rec"))
        assert dead_entry.set_aside_until > 0  # tried once, then set aside
        return used, [r.outputs["x"] for r in results]

    used, outputs = asyncio.run(scenario())
    assert used == 2  # both live replicas served requests
    for out in outputs:
        np.testing.assert_array_equal(out, np.arange(6, dtype=np.float32) * 2)


def test_no_replica_at_all_is_a_503_after_the_wait() -> None:
    async def scenario() -> None:
        router = Router({"rec": 4}, wait_for_replica_s=0.3)
        router.update([])
        await ReplicaBackend("rec", router).infer(
            InferRequest(model="rec", inputs={"x": np.zeros(1, np.float32)})
        )

    with pytest.raises(ModelNotReady, match="no replica of model 'rec' is reachable"):
        asyncio.run(scenario())


def test_requests_wait_for_a_free_replica_and_for_new_ones(
    servers: list[ReplicaServer],
) -> None:
    """At the in-flight limit a request waits; one that arrives before any replica is known
    goes out as soon as the directory lists one."""

    async def scenario() -> list[str]:
        router = Router({"rec": 1}, wait_for_replica_s=5)
        router.update([])
        backend = ReplicaBackend("rec", router)
        request = InferRequest(model="rec", inputs={"x": np.ones(3, np.float32)})
        pending = [asyncio.ensure_future(backend.infer(request)) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert not any(p.done() for p in pending)
        router.update([entry(servers[0].port)])
        return [r.version for r in await asyncio.gather(*pending)]

    assert asyncio.run(scenario()) == ["1", "1", "1"]


def test_stop_finishes_requests_in_flight() -> None:
    release = threading.Event()

    def slow(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        release.wait(5)
        return frame.encode({"ok": True})

    server = ReplicaServer(slow, threads=1, host="127.0.0.1")
    port = server.start()
    answers: list[Any] = []
    caller = threading.Thread(target=lambda: answers.append(call_replica("127.0.0.1", port, {})))
    caller.start()
    for _ in range(500):  # until the request is inside the handler
        if server.in_flight:
            break
        threading.Event().wait(0.01)
    assert server.in_flight == 1
    threading.Timer(0.3, release.set).start()
    server.stop(grace_s=3)
    caller.join(5)
    assert answers == [{"ok": True}]
    with pytest.raises(OSError):
        call_replica("127.0.0.1", port, {}, timeout_s=1)
