"""uvicorn's httptools protocol with the limits an edge facing hostile peers needs.

uvicorn has a keep-alive timeout and nothing else: measured, a client that sends half a
header (slowloris) or headers and part of a body keeps its connection forever, a 128 MiB
header is parsed and answered, and connections are accepted until the process runs out of
file descriptors. This subclass adds, per connection:

- a header deadline: the request line and headers must be complete within
  ``header_timeout_s`` of the connection (or of the first byte after a keep-alive pause);
- a body idle timeout: while a body is expected, bytes must keep arriving (a pause that is
  ours, reading paused because the app is busy, does not count);
- a header size and count limit (431), checked as bytes arrive, before they are parsed on;
- a body backstop: a route that reads past the limit without checking is cut off (the
  routes themselves refuse at ``max_request_mb`` with their own accounting);
- a connection cap: over it a new connection is answered 503 + Retry-After and closed;
- a connection whose response went out before its body was read is closed, so the rest of
  a refused 1 GiB upload is not received;
- with ``ingress.auth``, the bearer token checked as soon as the headers are complete: a
  request without an accepted one gets 401 before any route runs or any body is read.

Refusals are written straight to the transport (no app runs) with the JSON error body every
other error has; statuses and messages come from the error tree (``errors.to_status``).
"""

from __future__ import annotations

import asyncio
import http
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mpsserve.errors import (
    HeadersTooLarge,
    InvalidInput,
    MpsServeError,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    to_status,
)
from mpsserve.protocol.kserve import encode_error

if TYPE_CHECKING:
    from mpsserve.config import IngressLimits
    from mpsserve.ingress.auth import Authenticator

logger = logging.getLogger(__name__)

#: What uvicorn may hold beyond what a route has read (its 64 KiB high-water mark plus one
#: socket read), so the backstop never fires before a route's own, exact check.
BODY_SLACK_BYTES = 2**20
#: How long, and for how many bytes at most, a refused connection is drained before it is
#: closed (a client still uploading a refused body is cut off soon after its refusal).
LINGER_S = 1.0
LINGER_BYTES = 4 * 2**20


@dataclass(frozen=True)
class GuardLimits:
    header_timeout_s: float
    body_idle_timeout_s: float
    max_header_bytes: int
    max_headers: int
    max_connections: int
    max_body_bytes: int
    retry_after_s: int

    @classmethod
    def of(cls, limits: IngressLimits, max_connections: int, max_body_bytes: int) -> GuardLimits:
        """The config's ``ingress.limits`` for one listening port, with its own connection
        cap and body bound."""
        return cls(
            header_timeout_s=limits.header_timeout_s,
            body_idle_timeout_s=limits.body_idle_timeout_s,
            max_header_bytes=limits.max_header_kb * 1024,
            max_headers=limits.max_headers,
            max_connections=max_connections,
            max_body_bytes=max_body_bytes,
            retry_after_s=limits.retry_after_s,
        )


def guarded_protocol(
    limits: GuardLimits, auth: Authenticator | None = None
) -> type[GuardedHttpProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` bound to ``limits`` (and to
    ``auth``: None, no token is asked for)."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits, "auth": auth})


def refusal(
    exc: MpsServeError, retry_after_s: int | None = None, challenge: str | None = None
) -> bytes:
    """A complete HTTP/1.1 response refusing the request, closing the connection."""
    status, _, message = to_status(exc)
    body = encode_error(message)
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after_s is not None:
        lines.append(f"retry-after: {retry_after_s}")
    if challenge is not None:
        lines.append(f"www-authenticate: {challenge}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


class GuardedHttpProtocol(HttpToolsProtocol):
    limits: ClassVar[GuardLimits]
    auth: ClassVar[Authenticator | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = "headers"  # headers -> body -> app -> idle -> headers ...
        self._timer: asyncio.TimerHandle | None = None
        self._header_bytes = self._header_count = self._body_bytes = self._parsed_bytes = 0
        self._drained = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            message = f"the server holds its most connections ({self.limits.max_connections})"
            self._refuse(Overloaded(message), self.limits.retry_after_s, linger=False)
            return
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "closed":  # refused: what still arrives is dropped unread
            self._drained += len(data)
            if self._drained > LINGER_BYTES:
                self.transport.close()
            return
        if self._phase == "idle":  # a new request after a keep-alive pause
            self._start_headers()
        elif self._phase == "body":
            self._arm(self.limits.body_idle_timeout_s, self._body_timeout)
        if self._phase == "headers":
            self._header_bytes += len(data)
        super().data_received(data)
        if self._phase == "headers" and self._header_bytes > self.limits.max_header_bytes:
            self._refuse(self._headers_too_large())

    def _headers_too_large(self) -> HeadersTooLarge:
        kib = self.limits.max_header_bytes / 1024
        return HeadersTooLarge(f"request line and headers are over {kib:g} KiB")

    def _start_headers(self) -> None:
        self._phase = "headers"
        self._header_bytes = 0
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def on_message_begin(self) -> None:
        self._header_count = self._body_bytes = self._parsed_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._parsed_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._parsed_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._phase == "closed":
            return
        if self._header_count > self.limits.max_headers:
            many = f"{self._header_count} header fields; the limit is {self.limits.max_headers}"
            self._refuse(HeadersTooLarge(many))
            return
        if self._parsed_bytes > self.limits.max_header_bytes:
            self._refuse(self._headers_too_large())
            return
        if self.auth is not None and not self._authenticated(self.auth):
            return
        self._phase = "body"
        self._arm(self.limits.body_idle_timeout_s, self._body_timeout)
        super().on_headers_complete()

    def _authenticated(self, auth: Authenticator) -> bool:
        """Whether the request carries an accepted token; if not it is refused here, so no
        route runs and its body is dropped unread (the connection closes after the 401)."""
        exc = auth.check_http(self.url.split(b"?", 1)[0], self.headers)
        if exc is None:
            return True
        self._refuse(exc, challenge=auth.challenge(exc))
        return False

    def on_body(self, body: bytes) -> None:
        if self._phase == "closed":
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes + BODY_SLACK_BYTES:
            limit = self.limits.max_body_bytes
            self._refuse(PayloadTooLarge(f"request body is over {limit} bytes, the limit"))
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._phase == "closed":
            return
        if self._phase == "body":
            self._phase = "app"
            self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._phase in ("headers", "body"):  # answered before the body was all read
            self._phase = "closed"
            self._linger_close()
            return
        self._phase = "idle"  # uvicorn arms its keep-alive timeout
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse: the JSON error body, as everywhere else."""
        self._refuse(InvalidInput(msg))

    def _header_timeout(self) -> None:
        if self._phase == "headers":
            seconds = self.limits.header_timeout_s
            self._refuse(RequestTimeout(f"request headers not complete within {seconds:g}s"))

    def _body_timeout(self) -> None:
        if self._phase != "body":
            return
        if self.flow.read_paused:  # we stopped reading, not the client: wait on
            self._arm(self.limits.body_idle_timeout_s, self._body_timeout)
            return
        seconds = self.limits.body_idle_timeout_s
        self._refuse(RequestTimeout(f"no request body bytes for {seconds:g}s"))

    def _arm(self, delay_s: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(
        self,
        exc: MpsServeError,
        retry_after_s: int | None = None,
        linger: bool = True,
        challenge: str | None = None,
    ) -> None:
        """Answer ``exc`` (unless a response has begun) and close the connection."""
        self._disarm()
        self._phase = "closed"
        if self.transport.is_closing():
            return
        if self._may_answer():
            self.transport.write(refusal(exc, retry_after_s, challenge))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the route's own answer, if any, goes nowhere
            self.cycle.message_event.set()
        if linger:
            self._linger_close()
        else:  # nothing more is expected: the file descriptor goes back at once
            self.transport.close()

    def _may_answer(self) -> bool:
        """No response of this request has begun. ``cycle`` is still the previous request's
        on a keep-alive connection until the headers are complete; its answer was sent."""
        cycle = self.cycle
        return cycle is None or cycle.response_complete or not cycle.response_started

    def _linger_close(self) -> None:
        """Close after a short drain: closing a socket with unread bytes in it sends a
        reset, which can destroy the refusal before the client reads it (a client still
        uploading a refused body). Bytes arriving meanwhile are dropped, unparsed; after
        LINGER_S or LINGER_BYTES the connection is closed anyway."""
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)
