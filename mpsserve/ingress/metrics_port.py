"""The ingress's metrics port: ``GET /metrics`` in Prometheus text format, this service's
series only, on a stable port of its own (``ingress.metrics_port``, 8002 as Triton's).

mpsserve records its metrics in every process (ingresses, model replicas, the node sampler)
through ``ray.util.metrics``; each node's Ray metrics agent gathers them, beside Ray's own,
on a port Ray chooses. A scrape here reads that agent on this node and answers the series
that belong to the service: every ``ray_mpsserve_*`` sample and the ``ray_serve_*`` samples
whose ``application`` is this app (Ray Serve's request metrics, which the model replicas also
record for the frames they serve). Every ingress replica of a node answers the same (they
share the port with SO_REUSEPORT), so a scrape of ``host:8002`` sees the whole node.

The fetch is asynchronous, bounded in time and size, and shared: scrapes that arrive while
one read is under way, or within ``cache_s`` of it, get its answer, so a burst of scrapes
costs one read of the agent. When the agent cannot be read the answer is a 503 that says
why. Transport-free of Ray: the agent's address comes from a callable (``serving``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mpsserve.errors import MetricsUnavailable

#: Every sample of the service's own metrics (``mpsserve.metrics``, as Ray exports them).
SERVICE_PREFIX = "ray_mpsserve_"
#: Ray Serve's metrics: kept only where ``application`` names this app.
SERVE_PREFIX = "ray_serve_"
_PREFIXES = (SERVICE_PREFIX, SERVE_PREFIX)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: How long one read of the agent may take (Prometheus's default scrape timeout is 10 s).
AGENT_TIMEOUT_S = 5.0
#: The most bytes read from the agent: a node's whole export is a few MB with hundreds of
#: worker processes; more is refused (503), never buffered without bound.
AGENT_MAX_BYTES = 64 * 2**20
#: Scrapes within this long of a read share its answer.
CACHE_S = 1.0

_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\\n]|\\.)*)"\s*,?')


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sample_labels(line: str) -> tuple[str, dict[str, str]] | None:
    """A sample line's metric name and labels (values as written, escapes kept); None for a
    line that is not a well-formed sample."""
    brace = line.find("{")
    space = line.find(" ")
    if brace < 0 or (0 <= space < brace):
        name = line.split(None, 1)[0] if line.strip() else ""
        return (name, {}) if name else None
    labels: dict[str, str] = {}
    pos = brace + 1
    while True:
        if line.startswith("}", pos):
            return line[:brace], labels
        found = _LABEL.match(line, pos)
        if found is None:
            return None
        labels[found.group(1)] = found.group(2)
        pos = found.end()


def wanted(name: str, labels: dict[str, str], app: str) -> bool:
    """Whether a sample belongs to the service ``app``."""
    if name.startswith(SERVICE_PREFIX):
        return True
    return name.startswith(SERVE_PREFIX) and labels.get("application") == app


def _metadata_family(line: str) -> str | None:
    """The family a ``# HELP`` or ``# TYPE`` line describes; None for any other comment."""
    parts = line.split(None, 3)
    if len(parts) >= 3 and parts[0] == "#" and parts[1] in ("HELP", "TYPE"):
        return parts[2]
    return None


def filter_exposition(text: str, app: str) -> str:
    """The samples of ``text`` (Prometheus text format) that belong to the service ``app``,
    each family's ``# HELP`` and ``# TYPE`` lines before its first kept sample (once, even
    where the input repeats them); families with no kept sample leave no line."""
    out: list[str] = []
    meta: list[str] = []
    family: str | None = None
    described: set[str] = set()
    for line in text.splitlines():
        if line.startswith("#"):
            named = _metadata_family(line)
            if named is not None:
                if named != family:
                    meta, family = [], named
                meta.append(line)
            continue
        if not line.startswith(_PREFIXES):  # most of a node's lines: Ray's own, not parsed
            continue
        parsed = sample_labels(line)
        if parsed is None or not wanted(parsed[0], parsed[1], app):
            continue
        if family is not None and parsed[0].startswith(family) and family not in described:
            out.extend(meta)
            described.add(family)
        out.append(line)
    return "\n".join(out) + "\n" if out else ""


async def fetch_agent(address: str, timeout_s: float, max_bytes: int) -> bytes:
    """``GET http://{address}/metrics``: the body, or MetricsUnavailable saying why not."""
    import aiohttp

    url = f"http://{address}/metrics"
    headers = {"Accept": "text/plain", "Accept-Encoding": "identity"}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session,
            session.get(url, headers=headers, allow_redirects=False) as answer,
        ):
            if answer.status != 200:
                raise MetricsUnavailable(_cannot(address, f"it answered HTTP {answer.status}"))
            return await _read_at_most(answer.content, max_bytes, address)
    except TimeoutError as exc:
        raise MetricsUnavailable(_cannot(address, f"no answer within {timeout_s:g} s")) from exc
    except aiohttp.ClientError as exc:
        raise MetricsUnavailable(_cannot(address, str(exc) or type(exc).__name__)) from exc


async def _read_at_most(stream: Any, max_bytes: int, address: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(2**20)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise MetricsUnavailable(_cannot(address, f"its answer is over {max_bytes} bytes"))
        chunks.append(chunk)


def _cannot(address: str, why: str) -> str:
    return f"cannot read this node's Ray metrics agent at {address}: {why}"


Locate = Callable[[], str | None]


class AgentMetrics:
    """The service's series from this node's Ray metrics agent, read at most once per
    ``cache_s`` however many scrapes arrive (one read in flight, shared)."""

    def __init__(
        self,
        locate: Locate,
        app: str,
        timeout_s: float = AGENT_TIMEOUT_S,
        max_bytes: int = AGENT_MAX_BYTES,
        cache_s: float = CACHE_S,
    ) -> None:
        """``locate``: the agent's ``host:port``, or None while Ray does not know it (a
        blocking call: run in a thread, until it answers)."""
        self.locate, self.app = locate, app
        self.timeout_s, self.max_bytes, self.cache_s = timeout_s, max_bytes, cache_s
        self._address: str | None = None
        self._pending: asyncio.Future[str] | None = None
        self._last: tuple[float, str] | None = None

    async def text(self) -> str:
        if self._last is not None and time.monotonic() - self._last[0] < self.cache_s:
            return self._last[1]
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._read())
            self._pending.add_done_callback(self._done)
        return await asyncio.shield(self._pending)

    def _done(self, future: asyncio.Future[str]) -> None:
        self._pending = None
        if not future.cancelled() and future.exception() is None:
            self._last = (time.monotonic(), future.result())

    async def _read(self) -> str:
        if self._address is None:
            try:
                self._address = await asyncio.to_thread(self.locate)
            except Exception as exc:  # Ray's GCS unreachable, say
                raise MetricsUnavailable(
                    f"cannot ask Ray where its metrics agent is: {exc}"
                ) from exc
        if self._address is None:
            raise MetricsUnavailable("Ray has not said where this node's metrics agent listens")
        try:
            body = await fetch_agent(self._address, self.timeout_s, self.max_bytes)
        except MetricsUnavailable:
            self._address = None  # ask Ray again next time (the agent may have moved)
            raise
        text = body.decode("utf-8", errors="replace")
        return await asyncio.to_thread(filter_exposition, text, self.app)


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class MetricsApp:
    """ASGI: ``GET``/``HEAD /metrics`` -> the service's series; anything else 404 or 405."""

    def __init__(self, source: Callable[[], Awaitable[str]]) -> None:
        self.source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        status, body, headers = await self._answer(scope["path"], scope["method"])
        headers["Content-Length"] = str(len(body))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            }
        )
        if scope["method"] == "HEAD":
            body = b""
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, path: str, method: str) -> tuple[int, bytes, dict[str, str]]:
        plain = {"Content-Type": "text/plain; charset=utf-8"}
        if path != "/metrics":
            return 404, b"not found: the metrics port serves GET /metrics only\n", plain
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed: GET /metrics\n", {**plain, "Allow": "GET, HEAD"}
        try:
            text = await self.source()
        except MetricsUnavailable as exc:
            return 503, f"{exc.message}\n".encode(), {**plain, "Retry-After": "5"}
        return 200, text.encode(), {"Content-Type": CONTENT_TYPE}
