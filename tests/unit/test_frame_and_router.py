"""The ingress-to-replica path without Ray: frames, a real data port on loopback, routing."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from mpsserve.errors import (
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
    PayloadTooLarge,
    ReplicaUnavailable,
)
from mpsserve.ingress.backends import ReplicaBackend
from mpsserve.ingress.replica_server import ReplicaServer
from mpsserve.ingress.router import (
    AttemptPolicy,
    LatencyWindow,
    Router,
    call_replica,
)
from mpsserve.protocol import frame
from mpsserve.protocol.handshake import Keyring
from mpsserve.types import InferRequest
from tests.unit.conftest import Recorder


class _Keys:
    """One keyring for both ends, as a ``KeyWatcher`` would hold it."""

    ring = Keyring.generate()

    @classmethod
    def get(cls) -> Keyring:
        return cls.ring


KEYS = _Keys


def _decode(parts: list[frame.Buffer]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    raw = b"".join(bytes(p) for p in parts)
    head, size = frame.read_prefix(raw[: frame.PREFIX.size], 2**30, 2**30)
    header = frame.decode_header(raw[frame.PREFIX.size : frame.PREFIX.size + head])
    body = bytearray(raw[frame.PREFIX.size + head :])
    assert len(body) == size
    return header, frame.tensors(header, body)


def test_frame_round_trip_keeps_names_dtypes_shapes_and_values() -> None:
    tensors: dict[str, np.ndarray] = {
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
        frame.read_prefix(b"GET / HTTP/1.1"[: frame.PREFIX.size], 100, 100)
    with pytest.raises(frame.FrameError, match="ended inside a frame"):
        frame.read_prefix(b"MPS1", 100, 100)
    with pytest.raises(frame.FrameError, match="header of 8 bytes is over the 4-byte limit"):
        frame.read_prefix(frame.PREFIX.pack(frame.MAGIC, 8, 8), 4, 10)
    with pytest.raises(frame.FrameError, match="body of 8 bytes is over the 4-byte limit"):
        frame.read_prefix(frame.PREFIX.pack(frame.MAGIC, 8, 8), 10, 4)
    header = {"tensors": [["x", "FP32", [2], 8]]}
    with pytest.raises(frame.FrameError, match="its tensors take 8"):
        frame.tensors(header, bytearray(12))


def test_errors_travel_by_status_and_message() -> None:
    header = frame.error_header(InvalidInput("input 'dense' has 3 columns"))
    assert header["status"] == 400 and "error" not in header  # no class names on the wire
    with pytest.raises(InvalidInput, match="input 'dense' has 3 columns"):
        frame.raise_for_error(header)
    with pytest.raises(PayloadTooLarge):
        frame.raise_for_error(frame.error_header(PayloadTooLarge("too big")))
    with pytest.raises(ModelNotReady):  # every 503 the same way: UNAVAILABLE, retried later
        frame.raise_for_error(frame.error_header(ModelLoadError("v2 failed")))
    with pytest.raises(ReplicaUnavailable):  # the replica broke: another may take it
        frame.raise_for_error(frame.error_header(ReplicaUnavailable("device fault")))
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
    started = [ReplicaServer(echo, threads=2, host="127.0.0.1", keys=KEYS.get) for _ in range(2)]
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
        call_replica("127.0.0.1", port, {"op": "boom"}, KEYS.get())
    with pytest.raises(InvalidInput, match="bad tensor"):
        call_replica("127.0.0.1", port, {"op": "bad"}, KEYS.get())
    assert call_replica("127.0.0.1", port, {"op": "ping"}, KEYS.get())["ok"]


def test_backend_spreads_requests_and_retries_on_a_dead_replica(
    servers: list[ReplicaServer],
) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there: a replica that died

    async def scenario() -> tuple[int, list[np.ndarray]]:
        router = Router({"rec": 4}, keys=KEYS.get, wait_for_replica_s=1.0, set_aside_s=30)
        router.update("rec", [entry(s.port) for s in servers] + [entry(dead_port, "dead")])
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
        router = Router({"rec": 4}, keys=KEYS.get, wait_for_replica_s=0.3)
        router.update("rec", [])
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
        router = Router({"rec": 1}, keys=KEYS.get, wait_for_replica_s=5)
        router.update("rec", [])
        backend = ReplicaBackend("rec", router)
        request = InferRequest(model="rec", inputs={"x": np.ones(3, np.float32)})
        pending = [asyncio.ensure_future(backend.infer(request)) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert not any(p.done() for p in pending)
        router.update("rec", [entry(servers[0].port)])
        return [r.version for r in await asyncio.gather(*pending)]

    assert asyncio.run(scenario()) == ["1", "1", "1"]


def test_stop_finishes_requests_in_flight() -> None:
    release = threading.Event()

    def slow(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        release.wait(5)
        return frame.encode({"ok": True})

    server = ReplicaServer(slow, threads=1, host="127.0.0.1", keys=KEYS.get)
    port = server.start()
    answers: list[Any] = []
    caller = threading.Thread(
        target=lambda: answers.append(call_replica("127.0.0.1", port, {}, KEYS.get()))
    )
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
        call_replica("127.0.0.1", port, {}, KEYS.get(), timeout_s=1)


class Hung:
    """A replica whose inference never returns until released (a frozen process, a hung
    GPU); its data port still accepts connections and frames, as a SIGSTOPped one does."""

    def __init__(self, threads: int = 2) -> None:
        self.release = threading.Event()
        self.server = ReplicaServer(self.handle, threads=threads, host="127.0.0.1", keys=KEYS.get)
        self.port = self.server.start()

    def handle(self, header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        self.release.wait(20)
        return frame.encode({"ok": True, "version": "1", "port": self.port})

    def stop(self) -> None:
        self.release.set()
        self.server.stop(grace_s=1)


@pytest.fixture
def hung() -> Iterator[list[Hung]]:
    replicas = [Hung() for _ in range(3)]
    yield replicas
    for replica in replicas:
        replica.stop()


def answering(port: int) -> Any:
    """An echo handler that says which port answered."""

    def handle(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        return echo({**header, "port": port}, body)

    return handle


async def until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_a_silent_replica_is_routed_around_set_aside_and_back_when_it_answers(
    hung: list[Hung], recorder: Recorder
) -> None:
    good = ReplicaServer(
        lambda h, b: answering(good.port)(h, b), threads=2, host="127.0.0.1", keys=KEYS.get
    )
    good.start()
    frozen = hung[0]

    async def scenario() -> None:
        policy = AttemptPolicy(min_s=0.2, request_timeout_s=10)
        router = Router({"rec": 4}, keys=KEYS.get, set_aside_s=30, attempts=policy)
        router.update("rec", [entry(frozen.port, "frozen")])  # the request lands on it
        started = time.monotonic()
        pending = asyncio.ensure_future(router.call("rec", frame.encode({"op": "infer"})))
        await until(lambda: frozen.server.in_flight == 1)
        router.update("rec", [entry(frozen.port, "frozen"), entry(good.port, "good")])
        header, _ = await pending
        took = time.monotonic() - started
        assert header["port"] == good.port and 0.2 <= took < 1.5  # deadline: 10 s
        stuck = next(e for e in router.endpoints("rec") if e.key == "frozen")
        assert stuck.stalls == 1 and not stuck.usable(time.monotonic())
        assert stuck.in_flight == 1  # the stalled attempt runs on: it is the probe
        for _ in range(5):  # new requests avoid it
            header, _ = await router.call("rec", frame.encode({"op": "infer"}))
            assert header["port"] == good.port
        frozen.release.set()  # it answers after all: back in rotation at once
        await until(lambda: stuck.in_flight == 0 and stuck.usable(time.monotonic()))

    try:
        asyncio.run(scenario())
    finally:
        good.stop(grace_s=1)
    assert recorder.of("mpsserve_stalled_attempts_total") == [
        (1, {"model": "rec", "replica": "frozen"})
    ]


def test_the_attempt_timeout_follows_the_observed_latency() -> None:
    policy = AttemptPolicy(min_s=0.5, p99_factor=4)
    window = LatencyWindow(size=100, every=16)
    assert policy.timeout_s(window.p99_s) == 0.5  # nothing timed yet: the floor
    for _ in range(100):
        window.record(0.01)
    assert window.p99_s == 0.01 and policy.timeout_s(window.p99_s) == 0.5
    window.record(0.3)  # a slowdown raises it at once (no retry storm under overload)
    assert policy.timeout_s(window.p99_s) == pytest.approx(1.2)
    for _ in range(120):  # and comes down once it has left the window (sorted every 16)
        window.record(0.02)
    assert policy.timeout_s(window.p99_s) == 0.5


def test_when_every_replica_is_slow_the_timeout_grows_instead_of_retrying() -> None:
    """Overload: the one replica takes 0.3 s a request. The first request outlives the
    0.05 s floor (nothing timed yet); after that the timeout is 4 x 0.3 s and no request
    stalls or goes anywhere twice."""

    def slow(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        time.sleep(0.3)
        return frame.encode({"ok": True})

    server = ReplicaServer(slow, threads=2, host="127.0.0.1", keys=KEYS.get)
    port = server.start()

    async def scenario() -> tuple[int, float]:
        router = Router(
            {"rec": 4}, keys=KEYS.get, attempts=AttemptPolicy(min_s=0.05, request_timeout_s=10)
        )
        router.update("rec", [entry(port, "slow")])
        for _ in range(4):
            await router.call("rec", frame.encode({"op": "infer"}))
        return router.endpoints("rec")[0].stalls, router.attempt_timeout_s("rec")

    try:
        stalls, timeout_s = asyncio.run(scenario())
    finally:
        server.stop(grace_s=1)
    assert stalls == 1
    assert 1.2 <= timeout_s < 2.0


def test_attempts_are_bounded_and_none_starts_past_the_deadline(hung: list[Hung]) -> None:
    async def call(router: Router, deadline_s: float) -> None:
        with pytest.raises(TimeoutError):  # the data plane's deadline
            await asyncio.wait_for(router.call("rec", frame.encode({"op": "x"})), deadline_s)

    async def scenario() -> None:
        bounded = Router(
            {"rec": 4}, keys=KEYS.get, attempts=AttemptPolicy(min_s=0.1, max_attempts=2)
        )
        bounded.update("rec", [entry(h.port) for h in hung])
        await call(bounded, 1.0)  # 10 attempt timeouts, but at most 2 attempts
        assert sum(h.server.in_flight for h in hung) == 2
        assert all(e.in_flight == 0 for e in bounded.endpoints())  # closed at the deadline
        for replica in hung:
            replica.release.set()
        await until(lambda: sum(h.server.in_flight for h in hung) == 0)
        for replica in hung:
            replica.release.clear()
        # A floor past the request's own deadline: one attempt, never a second.
        late = Router(
            {"rec": 4}, keys=KEYS.get, attempts=AttemptPolicy(min_s=2, request_timeout_s=1)
        )
        late.update("rec", [entry(h.port) for h in hung])
        await call(late, 1.5)
        assert sum(h.server.in_flight for h in hung) == 1

    asyncio.run(scenario())


def test_a_hung_inference_thread_fails_the_health_check_a_queue_does_not() -> None:
    """Serve's health check (``ModelReplica._stalled``) reads how long the oldest handler
    call has run; requests waiting for a thread are load, not a stall."""
    from mpsserve.serving.model import ModelReplica

    stalled = ModelReplica.func_or_class._stalled  # type: ignore[attr-defined]  # a Serve Deployment
    replica = Hung(threads=1)  # one thread: a second request queues
    try:
        health = types.SimpleNamespace(_server=replica.server, _stall_s=0.3)
        assert replica.server.longest_running_s() == 0.0 and stalled(health) is None
        callers = [
            threading.Thread(
                target=call_replica, args=("127.0.0.1", replica.port, {}, KEYS.get(), 10)
            )
            for _ in range(2)
        ]
        for caller in callers:
            caller.start()
        time.sleep(0.5)
        assert replica.server.in_flight == 2  # one running, one queued
        assert 0.4 < replica.server.longest_running_s() < 2
        assert "inference stalled: a request has run for" in stalled(health)
        replica.release.set()
        for caller in callers:
            caller.join(10)
        assert replica.server.longest_running_s() == 0.0 and stalled(health) is None
    finally:
        replica.stop()


def test_a_replica_swapping_versions_gets_requests_only_when_no_other_has_room() -> None:
    """A replica that answers ``busy`` (it is loading a version) is left alone for a while
    when another replica has room; alone, it still serves; once it answers not busy it is
    back in the rotation."""
    state = {"busy": True}
    counts = {"swapping": 0, "calm": 0}

    def handler(name: str) -> Any:
        def answer(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
            counts[name] += 1
            busy = state["busy"] and name == "swapping"
            return frame.encode({"ok": True, "version": "1", "busy": busy})

        return answer

    swapping = ReplicaServer(handler("swapping"), threads=2, host="127.0.0.1", keys=KEYS.get)
    calm = ReplicaServer(handler("calm"), threads=2, host="127.0.0.1", keys=KEYS.get)
    for server in (swapping, calm):
        server.start()

    async def scenario() -> None:
        router = Router({"rec": 4}, keys=KEYS.get)
        router.update("rec", [entry(swapping.port, "swapping")])
        backend = ReplicaBackend("rec", router)
        request = InferRequest(model="rec", inputs={"x": np.ones(1, np.float32)})
        await backend.infer(request)  # alone: it serves, and says it is busy
        router.update("rec", [entry(swapping.port, "swapping"), entry(calm.port, "calm")])
        for _ in range(20):
            await backend.infer(request)
        assert counts == {"swapping": 1, "calm": 20}
        state["busy"] = False
        await asyncio.sleep(1.1)  # BUSY_S: one request finds it free again
        await asyncio.gather(*(backend.infer(request) for _ in range(40)))
        assert counts["swapping"] > 5

    try:
        asyncio.run(scenario())
    finally:
        for server in (swapping, calm):
            server.stop(grace_s=1)


def test_a_replica_with_a_device_fault_is_set_aside_and_the_request_served_elsewhere() -> None:
    """A replica whose CUDA context is gone answers ReplicaUnavailable: the request is fine,
    so it goes to another replica instead of failing with the broken one's error."""
    from mpsserve.errors import ReplicaUnavailable

    def broken(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        return frame.encode(frame.error_header(ReplicaUnavailable("device fault: gone")))

    def healthy(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        return frame.encode({"ok": True, "version": "1"})

    servers = [
        ReplicaServer(h, threads=2, host="127.0.0.1", keys=KEYS.get) for h in (broken, healthy)
    ]
    for server in servers:
        server.start()

    async def scenario() -> list[str]:
        router = Router({"rec": 4}, keys=KEYS.get, wait_for_replica_s=1.0, set_aside_s=30)
        router.update("rec", [entry(servers[0].port, "broken"), entry(servers[1].port, "healthy")])
        backend = ReplicaBackend("rec", router)
        request = InferRequest(model="rec", inputs={"x": np.ones(1, np.float32)})
        results = await asyncio.gather(*(backend.infer(request) for _ in range(20)))
        [gone] = [e for e in router.endpoints("rec") if e.key == "broken"]
        assert gone.set_aside_until > time.monotonic()
        return [r.version for r in results]

    try:
        assert asyncio.run(scenario()) == ["1"] * 20
    finally:
        for server in servers:
            server.stop(grace_s=1)


def test_the_data_port_bounds_in_flight_across_ingresses() -> None:
    """Three routers (three ingresses), each allowed 4 in flight to the one replica whose
    bound is 2: the port answers the excess ``full``, the routers wait and retry, every
    request is served and the replica never held more than 2."""

    def slow(header: dict[str, Any], body: bytearray) -> list[frame.Buffer]:
        time.sleep(0.01)
        return frame.encode({"ok": True, "version": "1"})

    server = ReplicaServer(slow, threads=2, host="127.0.0.1", keys=KEYS.get, max_in_flight=2)
    server.start()

    async def scenario() -> list[str]:
        routers = [Router({"rec": 4}, keys=KEYS.get) for _ in range(3)]
        request = InferRequest(model="rec", inputs={"x": np.ones(1, np.float32)})
        calls = []
        for router in routers:
            router.update("rec", [entry(server.port, "only")])
            backend = ReplicaBackend("rec", router)
            calls += [backend.infer(request) for _ in range(8)]
        results = await asyncio.gather(*calls)
        assert sum(sum(r.full_answers.values()) for r in routers) == server.overloaded
        return [r.version for r in results]

    try:
        assert asyncio.run(scenario()) == ["1"] * 24
        assert server.peak_in_flight == 2
        assert server.overloaded > 0  # the routers together did try to exceed it
    finally:
        server.stop(grace_s=1)


def test_a_leaving_replica_answers_unavailable_and_the_request_goes_elsewhere(
    servers: list[ReplicaServer],
) -> None:
    """``refuse`` (device fault, failed health check, shutdown): new frames are answered
    ``ReplicaUnavailable`` at once, so the ingress sets the replica aside and retries."""
    servers[0].refuse("the replica is exiting: device fault")
    with pytest.raises(ModelNotReady, match="exiting: device fault"):
        call_replica("127.0.0.1", servers[0].port, {"op": "ping"}, KEYS.get())

    async def scenario() -> None:
        router = Router({"rec": 4}, keys=KEYS.get, set_aside_s=30)
        router.update("rec", [entry(servers[0].port, "leaving"), entry(servers[1].port)])
        backend = ReplicaBackend("rec", router)
        request = InferRequest(model="rec", inputs={"x": np.ones(1, np.float32)})
        await asyncio.gather(*(backend.infer(request) for _ in range(10)))
        [leaving] = [e for e in router.endpoints("rec") if e.key == "leaving"]
        assert leaving.set_aside_until > time.monotonic()

    asyncio.run(scenario())


def test_an_update_replaces_only_that_models_replicas(servers: list[ReplicaServer]) -> None:
    async def scenario() -> None:
        router = Router({"rec": 4, "other": 4}, keys=KEYS.get)
        router.update("rec", [entry(servers[0].port, "a")])
        router.update("other", [entry(servers[1].port, "b")])
        router.update("rec", [])
        assert [e.key for e in router.endpoints()] == ["b"]
        assert router.endpoints("other")[0].model == "other"

    asyncio.run(scenario())
