"""Authentication and TLS on the public ports (``ingress.auth``, ``ingress.tls``).

Tokens are checked where a request's headers are complete and before anything else runs:
in the HTTP guard protocol (``guard.GuardedHttpProtocol``), before any route reads a body,
and in a gRPC server interceptor, before the request message is read. A refused request is
answered 401 / UNAUTHENTICATED, counted and logged like every refusal. When auth is off none
of this is installed: the guard tests one class attribute, gRPC has no interceptor.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from mpsserve.config import IngressAuth, IngressTls
from mpsserve.errors import ConfigError, Unauthenticated
from mpsserve.ingress.dataplane import client_request_id
from mpsserve.tokens import TokenSet

#: Probes that pass without a token when ``exempt_health`` is on; they say up/ready only.
HEALTH_PATHS = frozenset({b"/v2/health/live", b"/v2/health/ready", b"/-/healthz"})
HEALTH_RPCS = frozenset(
    {
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    }
)
REALM = 'Bearer realm="mpsserve"'
MISSING = "this server requires a bearer token (Authorization: Bearer TOKEN)"
REFUSED = "the bearer token is not accepted (unknown, revoked or expired)"
MODEL_PATH = re.compile(r"/v[12]/models/([^/:]+)")

#: Counts and logs one refused request: (model or "-", protocol, request id, error).
Account = Callable[[str, str, str | None, Unauthenticated], None]


def bearer(value: bytes | str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` value (scheme case-insensitive)."""
    if value is None:
        return None
    raw = value.encode("latin-1") if isinstance(value, str) else value
    scheme, _, token = raw.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


class Authenticator:
    """One ingress's token check, shared by its HTTP and gRPC servers."""

    def __init__(self, tokens: TokenSet, exempt_health: bool, account: Account) -> None:
        self.tokens, self.exempt_health, self.account = tokens, exempt_health, account

    @classmethod
    def of(cls, config: IngressAuth, account: Account) -> Authenticator:
        tokens = TokenSet(config.token_file, config.token_env, config.reload_interval_s)
        return cls(tokens, config.exempt_health, account)

    def refusal(self, authorization: bytes | str | None) -> Unauthenticated | None:
        """None when ``authorization`` (the header's value) carries an accepted token."""
        token = bearer(authorization)
        if token is None:
            return Unauthenticated(MISSING)
        return None if self.tokens.accepts(token) else Unauthenticated(REFUSED)

    def check_http(
        self, path: bytes, headers: Iterable[tuple[bytes, bytes]]
    ) -> Unauthenticated | None:
        """None when an HTTP request may go on; else its refusal, counted and logged here."""
        if self.exempt_health and path in HEALTH_PATHS:
            return None
        found = dict(headers)  # names are lower-case (uvicorn)
        exc = self.refusal(found.get(b"authorization"))
        if exc is None:
            return None
        rid = found.get(b"x-request-id")
        model = MODEL_PATH.match(path.decode("latin-1"))
        self.account(
            model.group(1) if model else "-",
            "http",
            client_request_id(rid.decode("latin-1") if rid else None),
            exc,
        )
        return exc

    def challenge(self, exc: Unauthenticated) -> str:
        """The ``WWW-Authenticate`` value of a 401 (RFC 6750)."""
        return REALM if exc.message == MISSING else f'{REALM}, error="invalid_token"'


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a call without an accepted ``authorization`` metadata token,
    decided on the call's metadata: the handler it answers with never reads the request."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if self.auth.exempt_health and details.method in HEALTH_RPCS:
            return await continuation(details)
        metadata = {key: value for key, value in details.invocation_metadata or ()}
        exc = self.auth.refusal(metadata.get("authorization"))
        if exc is None:
            return await continuation(details)
        rid = metadata.get("x-request-id")
        request_id = client_request_id(rid if isinstance(rid, str) else None)
        self.auth.account("-", "grpc", request_id, exc)
        return _deny(exc.message)


def _deny(message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses without reading the request (stream-in: nothing is pulled)."""

    async def abort(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_unary_rpc_method_handler(abort)


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(f"ingress.tls.{field}: cannot read {path}: {exc.strerror}") from None


def server_ssl_context(tls: IngressTls) -> ssl.SSLContext:
    """The HTTPS context: TLS 1.2 or later, Python's default ciphers, and with
    ``client_ca_file`` a client certificate required. Unparseable files fail here, at
    startup, naming the field."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"ingress.tls.cert_file / key_file: cannot load {tls.cert_file} with "
            f"{tls.key_file}: {exc}"
        ) from None
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"ingress.tls.client_ca_file: cannot load {tls.client_ca_file}: {exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def grpc_server_credentials(tls: IngressTls) -> grpc.ServerCredentials:
    """The same certificate, key and client CA for gRPC (parsed by ``server_ssl_context``
    first, which names a bad file; grpc core's own errors do not)."""
    server_ssl_context(tls)
    ca = _read(tls.client_ca_file, "client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "key_file"), _read(tls.cert_file, "cert_file"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def describe(auth: IngressAuth | None, tls: IngressTls | None) -> str:
    """One line on what protects the public ports (the banner and the ingress's log)."""
    if auth is None and tls is None:
        return "NO authentication and NO TLS: anyone who reaches the ports can infer"
    parts = [
        "bearer tokens" + (" (health probes exempt)" if auth.exempt_health else "")
        if auth
        else "NO authentication",
        ("mutual TLS" if tls.client_ca_file else "TLS") if tls else "NO TLS (plain text)",
    ]
    return ", ".join(parts)


def refused_now(account: Callable[..., None]) -> Account:
    """An ``Account`` over ``DataPlane.rejected`` (which wants the time the request began:
    for a refusal at the headers, now)."""

    def record(model: str, protocol: str, request_id: str | None, exc: Unauthenticated) -> None:
        account(model, protocol, request_id, exc, time.perf_counter())

    return record
