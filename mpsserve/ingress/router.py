"""The ingress's view of the model replicas: their data ports, how busy each is, and the
call that sends one frame to the least busy one.

Endpoints come from Ray Serve: the replica set Serve keeps for each model deployment, with
the data-port address each replica published (``serving.replica_set``). Each request goes to
the replica with the fewest requests in flight from this ingress (``LeastLoaded``), over a
pooled connection (authenticated once, when it
opens: ``protocol.handshake``; retired before the replica's idle timeout would close it). A
replica that cannot be reached (it died, Serve is replacing it) is set aside and the request
goes to another one, so a replica replacement or a redeploy costs no request: inference is
idempotent.

A replica that is reachable but stops answering (frozen, a hung inference thread, a GPU
stuck) is caught by a per-attempt timeout derived from what this ingress observes:

    attempt timeout = max(attempt_timeout_min_s, attempt_timeout_p99_factor x P99)

where P99 is over the model's last ``WINDOW`` answered exchanges (frame out to answer in,
so it includes the replica's queue). An attempt past its timeout is *stalled*: its replica
is set aside (warning, ``mpsserve_stalled_attempts_total``) and the request also goes to
another replica that has room; the first answer wins. The stalled attempt is not cancelled:
when it answers after all, its replica is back in rotation at once (a slow first call, a
CUDA-graph capture, a GC pause cost nothing but the extra attempt), and it is closed at the
request's deadline otherwise. Losing attempts run on to their answer (the replica does the
work either way; its connection goes back to the pool) or to the deadline, so a replica's
``in_flight`` is what it really has to do.

Why this does not make overload worse: (1) the timeout follows the observed latency, and
the winners' times (slow ones included) feed the window, so when every replica slows down
the timeout grows with them within a few requests; (2) another attempt goes only to a
replica below its in-flight limit and never waits for one, so when all are busy nothing
extra is sent; (3) at most ``max_attempts`` attempts of a request run at once, each on a
different replica, and none starts past the request's deadline; (4) the floor keeps a slow
first request (TF's first call, graph capture) from being duplicated within milliseconds.
A replica swapping model versions answers ``busy`` (loading holds its interpreter for most of
a second): for ``BUSY_S`` it gets requests only when no other replica has room, then one
request tells whether it is still busy; a swap costs a few slow requests per ingress, not a
second of every request sent to that replica.
A replica set aside comes back when a stalled attempt to it answers, or after
``set_aside_s``; Serve's health check (``ModelReplica.check_health``,
``health_check_timeout_s``) replaces one that stays broken, and its long poll drops it from
this router's set.

The in-flight bound that holds across ingresses is the replica's: its data port answers a
frame past its ``max_ongoing_requests`` with ``full`` at once. Such a replica is *full*, not
broken: for ``FULL_S`` it gets no request from this ingress (one of this ingress's own
attempts to it ending frees it sooner), and the request goes to another replica with room or
waits for one; it is not counted as tried, so it may take the request once it has room.
The per-ingress limit (``max_in_flight``) stays as the first, local filter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mpsserve import metrics
from mpsserve.errors import ModelNotReady, ReplicaUnavailable
from mpsserve.ingress.transport import WireLimits
from mpsserve.protocol import frame, handshake
from mpsserve.protocol.handshake import Keyring

logger = logging.getLogger(__name__)

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_FAILURES = (
    OSError,
    ConnectionError,
    asyncio.IncompleteReadError,
    frame.FrameError,
    ReplicaUnavailable,
)
WINDOW = 256  # answered exchanges per model behind the P99
BUSY_S = 1.0  # how long a replica that answered "busy" gets no request another one could take
FULL_S = 0.02  # how long a replica that answered "full" gets no request from this ingress
DEFAULT_MAX_IN_FLIGHT = 8  # a model's bound per replica until its replicas publish theirs


@dataclass(frozen=True)
class AttemptPolicy:
    """When an attempt counts as stalled, and how many attempts a request may have."""

    min_s: float = 1.0
    p99_factor: float = 4.0
    max_attempts: int = 3
    request_timeout_s: float = 30.0

    def timeout_s(self, p99_s: float | None) -> float:
        """The per-attempt timeout; the floor alone until a first answer was timed."""
        return self.min_s if p99_s is None else max(self.min_s, self.p99_factor * p99_s)


class LatencyWindow:
    """The last ``size`` answered exchanges of one model and their P99. The P99 is sorted
    again every ``every`` samples, or at once when a sample is above it (a slowdown raises
    the timeout right away); sorting on each request would cost the ingress CPU."""

    def __init__(self, size: int = WINDOW, every: int = 16) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=size)
        self._every, self._count = every, 0
        self.p99_s: float | None = None

    def record(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._count += 1
        if self.p99_s is None or seconds > self.p99_s or self._count % self._every == 0:
            ordered = sorted(self._samples)
            self.p99_s = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


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
    idle: list[tuple[Connection, float]] = field(default_factory=list)  # (pooled, since)
    set_aside_until: float = 0.0
    busy_until: float = 0.0  # it said it is swapping versions: others first until then
    full_until: float = 0.0  # it said it is at its in-flight bound: none until then
    stalls: int = 0  # attempts to it that outlived their timeout, since it joined

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
        for (_, writer), _ in self.idle:
            writer.close()
        self.idle.clear()

    def pooled(self, max_idle_s: float) -> Connection | None:
        """A pooled connection idle less than ``max_idle_s`` that the replica has not closed;
        older ones are closed (the replica closes idle ones: reusing one would fail)."""
        now = time.monotonic()
        while self.idle:
            (reader, writer), since = self.idle.pop()
            if now - since < max_idle_s and not reader.at_eof():
                return reader, writer
            writer.close()
        return None


class LeastLoaded:
    """The routing policy: among replicas not tried, usable, below ``limit`` requests from
    this ingress and not full, the one with the fewest in flight (ties at random); one
    swapping versions only when no other qualifies."""

    def pick(self, endpoints: list[Endpoint], limit: int, now: float) -> Endpoint | None:
        free = [
            e for e in endpoints if e.usable(now) and e.in_flight < limit and e.full_until <= now
        ]
        free = [e for e in free if e.busy_until <= now] or free
        if not free:
            return None
        least = min(e.in_flight for e in free)
        return random.choice([e for e in free if e.in_flight == least])


@dataclass
class _Attempt:
    """One try of a request on one replica."""

    endpoint: Endpoint
    started: float
    stall_at: float  # math.inf: its timeout would pass the request's deadline
    stalled: bool = False


@dataclass
class _Request:
    """A request's attempts: those running, the replicas tried, the last failure."""

    model: str
    parts: list[frame.Buffer]
    deadline: float
    running: dict[asyncio.Future[Any], _Attempt] = field(default_factory=dict)
    tried: set[str] = field(default_factory=set)
    last: BaseException | None = None
    answered: bool = False


class Router:
    """Routes frames to replicas; every method runs on the ingress's event loop."""

    def __init__(
        self,
        max_in_flight: dict[str, int],
        wait_for_replica_s: float = 15.0,
        set_aside_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        attempts: AttemptPolicy | None = None,
        *,
        keys: Callable[[], Keyring],
        limits: WireLimits | None = None,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.wait_for_replica_s = wait_for_replica_s
        self.set_aside_s = set_aside_s
        self.connect_timeout_s = connect_timeout_s
        self.keys = keys
        self.limits = limits or WireLimits()
        self.attempts = attempts or AttemptPolicy()
        self.latency: dict[str, LatencyWindow] = collections.defaultdict(LatencyWindow)
        self.policy = LeastLoaded()
        self.full_answers: collections.Counter[str] = collections.Counter()
        self._endpoints: dict[str, Endpoint] = {}
        self._changed = asyncio.Event()
        self._lingering: set[asyncio.Future[Any]] = set()  # losers left to run on

    # -- Serve's replica set ------------------------------------------------------------------

    def update(self, model: str, entries: list[dict[str, Any]]) -> None:
        """Replace ``model``'s endpoints with Serve's running replicas of it (keeps live
        counters of those that stay)."""
        fresh = {e["key"]: {**e, "model": model} for e in entries}
        limits = {int(e["max_in_flight"]) for e in entries if e.get("max_in_flight")}
        if limits:  # replicas of one deployment share it (min: mid-rollout, the safe one)
            self.max_in_flight[model] = min(limits)
        for key in [k for k, e in self._endpoints.items() if e.model == model]:
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

    def attempt_timeout_s(self, model: str) -> float:
        """How long an attempt on ``model`` may take now before it counts as stalled."""
        return self.attempts.timeout_s(self.latency[model].p99_s)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- requests ---------------------------------------------------------------------------

    async def call(self, model: str, parts: list[frame.Buffer]) -> tuple[dict[str, Any], bytes]:
        """Send one frame to a replica of ``model``; returns the first answer's header and
        body. Tries another replica when one cannot be reached, and sends the frame to
        another one as well when an attempt stalls (see the module's docstring)."""
        request = _Request(model, parts, time.monotonic() + self.attempts.request_timeout_s)
        try:
            return await self._until_answered(request)
        finally:
            self._leave(request)

    async def _until_answered(self, request: _Request) -> tuple[dict[str, Any], bytes]:
        while True:
            await self._launch_if_due(request)
            for task in await self._wait(request):
                answer = self._outcome(request, task, request.running.pop(task))
                if answer is not None:
                    return answer

    async def _launch_if_due(self, request: _Request) -> None:
        """The first attempt (or the next once every one failed) waits for a replica; one
        beside stalled attempts goes only to a replica with room now, never waits."""
        if not request.running:
            endpoint = await self._acquire(request.model, request.tried, request.last)
            self._launch(request, endpoint)
        elif self._may_add(request):
            found = self._pick(request.model, request.tried)
            if found is not None:
                self._launch(request, found)

    def _may_add(self, request: _Request) -> bool:
        return (
            len(request.running) < self.attempts.max_attempts
            and all(a.stalled for a in request.running.values())
            and time.monotonic() < request.deadline
        )

    def _launch(self, request: _Request, endpoint: Endpoint) -> None:
        started = time.monotonic()
        stall_at = started + self.attempt_timeout_s(request.model)
        attempt = _Attempt(endpoint, started, stall_at if stall_at < request.deadline else math.inf)
        task = asyncio.ensure_future(self._exchange(endpoint, request.parts))
        task.add_done_callback(functools.partial(self._finished, request.model, attempt))
        request.running[task] = attempt
        request.tried.add(endpoint.key)

    async def _wait(self, request: _Request) -> set[asyncio.Future[Any]]:
        """Until an attempt ends or the next one stalls; while another attempt is due but
        no replica had room, until the router changes (a slot freed, a replica joined)."""
        stalls = [a.stall_at for a in request.running.values() if not a.stalled]
        next_stall = min(stalls, default=math.inf)
        waiting: set[asyncio.Future[Any]] = set(request.running)
        changed: asyncio.Future[Any] | None = None
        timeout = None if next_stall == math.inf else max(next_stall - time.monotonic(), 0.0)
        if timeout is None and self._may_add(request):
            changed, timeout = asyncio.ensure_future(self._changed.wait()), 0.5
            waiting.add(changed)
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if changed is not None:
                changed.cancel()
        self._mark_stalled(request)
        return {task for task in done if task in request.running}

    def _mark_stalled(self, request: _Request) -> None:
        now = time.monotonic()
        for task, attempt in request.running.items():
            if not attempt.stalled and now >= attempt.stall_at and not task.done():
                attempt.stalled = True
                self._set_aside_stalled(request.model, attempt, now)

    def _set_aside_stalled(self, model: str, attempt: _Attempt, now: float) -> None:
        endpoint = attempt.endpoint
        endpoint.stalls += 1
        endpoint.set_aside_until = max(endpoint.set_aside_until, now + self.set_aside_s)
        metrics.count_stalled_attempt(model, endpoint.key)
        p99 = self.latency[model].p99_s
        logger.warning(
            "replica %s of %s (%s:%d, pid %d) has not answered in %.2fs (recent P99 %s); "
            "set aside, sending the request to another replica as well",
            endpoint.key,
            model,
            endpoint.host,
            endpoint.port,
            endpoint.pid,
            now - attempt.started,
            "unknown" if p99 is None else f"{p99 * 1000:.1f} ms",
        )

    def _outcome(
        self, request: _Request, task: asyncio.Future[Any], attempt: _Attempt
    ) -> tuple[dict[str, Any], bytes] | None:
        """An ended attempt's answer; None when its replica failed (set aside)."""
        exc = task.exception()
        if exc is None and task.result()[0].get("full"):
            self._full(request, attempt.endpoint)
            return None
        if exc is None and task.result()[0].get("retry"):  # the replica broke, not the request
            exc = ReplicaUnavailable(str(task.result()[0].get("message")))
        elif exc is None:
            self.latency[request.model].record(time.monotonic() - attempt.started)
            request.answered = True
            answer: tuple[dict[str, Any], bytes] = task.result()
            return answer
        if not isinstance(exc, _FAILURES):
            raise exc
        request.last = exc
        endpoint = attempt.endpoint
        endpoint.set_aside_until = time.monotonic() + self.set_aside_s
        endpoint.close_idle()
        logger.warning(
            "replica %s of %s (%s:%d) failed a request (%s); trying another",
            endpoint.key,
            request.model,
            endpoint.host,
            endpoint.port,
            exc or type(exc).__name__,
        )
        return None

    def _full(self, request: _Request, endpoint: Endpoint) -> None:
        """The replica is at its bound (other ingresses' requests): not broken, not tried."""
        endpoint.full_until = time.monotonic() + FULL_S
        request.tried.discard(endpoint.key)
        self.full_answers[request.model] += 1

    def _finished(self, model: str, attempt: _Attempt, task: asyncio.Future[Any]) -> None:
        """Every attempt's end (won, lost, failed or cancelled): its slot is free again, and
        a replica set aside for stalling that answered after all is back in rotation."""
        endpoint = attempt.endpoint
        endpoint.in_flight -= 1
        self._wake()
        answered = not task.cancelled() and task.exception() is None
        if answered and not task.result()[0].get("full"):
            endpoint.full_until = 0.0  # one of ours ended there: it has room again
            busy = bool(task.result()[0].get("busy"))
            endpoint.busy_until = time.monotonic() + BUSY_S if busy else 0.0
        if attempt.stalled and answered and endpoint.set_aside_until > time.monotonic():
            endpoint.set_aside_until = 0.0
            logger.info(
                "replica %s of %s answered after %.2fs; back in rotation",
                endpoint.key,
                model,
                time.monotonic() - attempt.started,
            )

    def _leave(self, request: _Request) -> None:
        """Attempts still running when the request ends: after an answer they run on up to
        the request's deadline (a stalled replica that answers comes back; a healthy one's
        connection goes back to the pool); after a failure or the deadline they close."""
        remaining = request.deadline - time.monotonic()
        loop = asyncio.get_running_loop()
        for task in request.running:
            if not request.answered or remaining <= 0:
                task.cancel()
                continue
            self._lingering.add(task)
            handle = loop.call_later(remaining, task.cancel)
            task.add_done_callback(functools.partial(self._forget, handle))

    def _forget(self, handle: asyncio.TimerHandle, task: asyncio.Future[Any]) -> None:
        handle.cancel()
        self._lingering.discard(task)

    def _pick(self, model: str, tried: set[str]) -> Endpoint | None:
        """Takes the replica of ``model`` not tried yet that the policy picks, if any."""
        limit, now = self.max_in_flight.get(model, DEFAULT_MAX_IN_FLIGHT), time.monotonic()
        untried = [e for e in self.endpoints(model) if e.key not in tried]
        endpoint = self.policy.pick(untried, limit, now)
        if endpoint is not None:
            endpoint.in_flight += 1
        return endpoint

    async def _acquire(self, model: str, tried: set[str], last: BaseException | None) -> Endpoint:
        """Waits for a replica with room; gives up after ``wait_for_replica_s`` with none
        usable at all."""
        waited_since = time.monotonic()
        while (endpoint := self._pick(model, tried)) is None:
            now = time.monotonic()
            known = [e for e in self.endpoints(model) if e.key not in tried and e.usable(now)]
            if not known and now - waited_since > self.wait_for_replica_s:
                reason = f"; the last one failed with {last!r}" if last is not None else ""
                raise ModelNotReady(
                    f"no replica of model {model!r} is reachable "
                    f"(waited {self.wait_for_replica_s:g}s){reason}"
                )
            changed = self._changed
            with contextlib.suppress(TimeoutError):  # a release or a new list frees one
                await asyncio.wait_for(changed.wait(), self._until_room(model, now))
        return endpoint

    def _until_room(self, model: str, now: float) -> float:
        """How long to wait for a change before looking again: until the first full
        replica may take requests again, at most half a second."""
        ends = [e.full_until - now for e in self.endpoints(model) if e.full_until > now]
        return max(min([0.5, *ends]), 0.001)

    async def _exchange(
        self, endpoint: Endpoint, parts: list[frame.Buffer]
    ) -> tuple[dict[str, Any], bytes]:
        connection = endpoint.pooled(self.limits.idle_timeout_s / 2)
        if connection is None:
            connection = await asyncio.wait_for(self._connect(endpoint), self.connect_timeout_s)
        reader, writer = connection
        done = False
        try:
            writer.writelines(parts)
            await writer.drain()
            head, size = frame.read_prefix(
                await reader.readexactly(frame.PREFIX.size),
                self.limits.max_response_bytes,
                self.limits.max_response_bytes,
            )
            header = frame.decode_header(await reader.readexactly(head))
            body = await reader.readexactly(size) if size else b""
            done = True
        finally:
            if done and self._endpoints.get(endpoint.key) is endpoint:
                endpoint.idle.append((connection, time.monotonic()))
            else:  # cancelled (deadline) or failed mid-exchange: the stream is unusable
                writer.close()
        return header, body

    async def _connect(self, endpoint: Endpoint) -> Connection:
        """A new connection to ``endpoint``, authenticated (``protocol.handshake``)."""
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        try:
            challenge = await reader.readexactly(handshake.CHALLENGE.size)
            writer.write(handshake.answer(self.keys(), challenge))
            if await reader.readexactly(len(handshake.ACCEPTED)) != handshake.ACCEPTED:
                raise handshake.HandshakeError("the data port sent no handshake verdict")
        except asyncio.IncompleteReadError as exc:
            writer.close()
            raise handshake.HandshakeError(
                "the data port closed the connection during the handshake (it holds none "
                "of this process's transport keys?)"
            ) from exc
        except BaseException:
            writer.close()
            raise
        return reader, writer


def call_replica(
    host: str, port: int, header: dict[str, Any], keys: Keyring, timeout_s: float = 5.0
) -> Any:
    """One frame to a replica's data port from blocking code (``mpsserve status``, which
    reads the keyring through Ray); returns the answer's header, or raises its error."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        reader = sock.makefile("rb")
        sock.sendall(handshake.answer(keys, reader.read(handshake.CHALLENGE.size)))
        if reader.read(len(handshake.ACCEPTED)) != handshake.ACCEPTED:
            raise handshake.HandshakeError("the data port refused the handshake")
        sock.sendall(b"".join(bytes(part) for part in frame.encode(header)))
        head, size = frame.read_prefix(reader.read(frame.PREFIX.size), 2**30, 2**30)
        answer = frame.decode_header(reader.read(head))
        reader.read(size)
    frame.raise_for_error(answer)
    return answer
