"""Request bodies through shared memory between an ingress and a replica on one node.

Real sockets and real /dev/shm segments (a temporary directory stands in where a test needs a
directory of its own): the body arrives intact, no file outlives the exchange, a replica that
cannot use the segment gets the body by socket, and malformed or foreign segments are refused.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mpsserve.ingress import shared_body
from mpsserve.ingress.backends import ReplicaBackend
from mpsserve.ingress.replica_server import ReplicaServer
from mpsserve.ingress.router import Router
from mpsserve.ingress.shared_body import Inbox, Outbox, SharedBodyUnavailable
from mpsserve.protocol import frame
from mpsserve.types import InferRequest
from tests.unit.test_frame_and_router import KEYS

pytestmark = pytest.mark.skipif(not shared_body.SHM_DIR.is_dir(), reason="no /dev/shm")

seen_sizes: list[int] = []  # body sizes, as the handler got them


def echo(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
    seen_sizes.append(len(body))
    doubled = {name: array * 2 for name, array in frame.tensors(header, body).items()}
    return frame.encode({"ok": True, "version": "1"}, doubled)


def ours() -> set[str]:
    return {p.name for p in shared_body.SHM_DIR.glob(f"{shared_body.PREFIX}{os.getpid()}-*")}


@pytest.fixture(params=[True, False], ids=["replica-takes-shm", "replica-refuses-shm"])
def server(request: pytest.FixtureRequest) -> Iterator[ReplicaServer]:
    started = ReplicaServer(
        echo, threads=2, host="127.0.0.1", keys=KEYS.get, shared_memory=request.param
    )
    started.start()
    yield started
    started.stop(grace_s=1)


def _infer(server: ReplicaServer, node: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    async def scenario() -> list[np.ndarray]:
        router = Router({"rec": 4}, keys=KEYS.get, shared_memory=True)
        router.update(
            "rec",
            [{"key": "r", "model": "rec", "host": "127.0.0.1", "port": server.port, "node": node}],
        )
        backend = ReplicaBackend("rec", router)
        outputs = []
        for x in arrays:  # one connection, sequential: the segment is reused and grows
            outputs.append((await backend.infer(InferRequest("rec", {"x": x}))).outputs["x"])
        for endpoint in router.endpoints():
            endpoint.close_idle()
        return outputs

    return asyncio.run(scenario())


def test_bodies_travel_through_shared_memory_and_leave_no_file(server: ReplicaServer) -> None:
    seen_sizes.clear()
    rng = np.random.default_rng(0)
    arrays = [rng.random(n, dtype=np.float32) for n in (10, 200_000, 150_000, 600_000, 1000)]
    for got, x in zip(_infer(server, socket.gethostname(), arrays), arrays, strict=True):
        np.testing.assert_array_equal(got, x * 2)
    assert seen_sizes == [a.nbytes for a in arrays]
    big = sum(a.nbytes >= shared_body.MIN_BYTES for a in arrays)
    # refused, the replica gets the first big body again and then all by socket
    assert server.shared_bodies == (big if server.shared_memory else 0)
    assert ours() == set()  # unlinked after the first answer, mappings closed at the end


def test_another_node_gets_bodies_by_socket(server: ReplicaServer) -> None:
    seen_sizes.clear()
    x = np.ones(100_000, np.float32)
    np.testing.assert_array_equal(_infer(server, "elsewhere", [x])[0], x * 2)
    assert (seen_sizes, server.shared_bodies) == ([x.nbytes], 0)


def test_outbox_grows_in_powers_of_two_and_unlinks(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    first = box.put([b"a" * 10], 10)
    assert first is not None and (tmp_path / first).stat().st_size == shared_body.FIRST_BYTES
    second = box.put(
        [np.zeros(shared_body.FIRST_BYTES + 1, np.uint8).data], shared_body.FIRST_BYTES + 1
    )
    assert second is not None and second != first and not (tmp_path / first).exists()
    assert (tmp_path / second).stat().st_size == 2 * shared_body.FIRST_BYTES
    box.answered()
    assert list(tmp_path.iterdir()) == []
    box.close()


def test_outbox_without_room_falls_back(tmp_path: Path) -> None:
    assert Outbox(tmp_path / "missing").put([b"x"], 1) is None


def test_inbox_refuses_what_no_ingress_sends(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path)
    good = f"{shared_body.PREFIX}1-{'0' * 32}"
    for spec in ([good], ["../etc/passwd", 4], [good, -1], [good, 2**40], "x", [good, "4"]):
        with pytest.raises(frame.FrameError):
            inbox.take(spec, 2**20)
    with pytest.raises(SharedBodyUnavailable, match="cannot open"):
        inbox.take([good, 4], 2**20)
    (tmp_path / "target").write_bytes(b"secret")
    (tmp_path / good).symlink_to(tmp_path / "target")
    with pytest.raises(SharedBodyUnavailable, match="cannot open"):  # links are not followed
        inbox.take([good, 4], 2**20)
    (tmp_path / good).unlink()
    (tmp_path / good).write_bytes(b"0123456789")
    assert inbox.take([good, 4], 2**20) == bytearray(b"0123")
    with pytest.raises(frame.FrameError, match="overruns"):
        inbox.take([good, 11], 2**20)
    inbox.close()


def test_out_of_band_frame_names_the_segment_and_carries_no_body() -> None:
    parts = frame.encode({"op": "infer"}, {"x": np.arange(4, dtype=np.int64)})
    shared = frame.out_of_band(parts, "seg")
    _, size = frame.read_prefix(bytes(shared[0]), 2**16, 2**20)
    assert size == 0 and len(shared) == 2
    header = frame.decode_header(shared[1])
    assert header["shm"] == ["seg", 32] and header["tensors"] == [["x", "INT64", [4], 32]]
