"""Item 4 of issue 14: bearer tokens and TLS on the public ports, against a real uvicorn and
a real grpc.aio server on loopback (no Ray), with a CA, server and client certificates made
here (tests/certs.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
import uvicorn

from mpsserve.config import IngressAuth, IngressConfig, IngressTls, load_config, parse_config
from mpsserve.errors import ConfigError, GrpcCode, Unauthenticated, to_status
from mpsserve.ingress.auth import (
    Authenticator,
    AuthInterceptor,
    bearer,
    describe,
    grpc_server_credentials,
    refused_now,
    server_ssl_context,
)
from mpsserve.ingress.dataplane import DataPlane
from mpsserve.ingress.grpc import GrpcLimits, start_grpc_server
from mpsserve.ingress.guard import GuardLimits, guarded_protocol
from mpsserve.ingress.http import create_http_app
from mpsserve.tokens import TokenSet, parse_tokens
from tests.certs import Pki, make_pki
from tests.echo import echo_backend

GOOD = "good-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"
LIMITS = GuardLimits(
    header_timeout_s=2,
    body_idle_timeout_s=2,
    max_header_bytes=8192,
    max_headers=50,
    max_connections=32,
    max_body_bytes=64 << 20,
    retry_after_s=1,
)


# -- token files -----------------------------------------------------------------------------


def test_token_lines_comments_and_expiry() -> None:
    text = f"# rotated 2026-01\n{GOOD}\n\n{OTHER} not_after=2030-01-01T00:00:00Z  # old one\n"
    first, second = parse_tokens(text, "t")
    assert first.value == GOOD.encode() and first.not_after is None
    assert second.not_after == 1893456000.0


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("short", "16+ characters"),
        (f"{GOOD} not_after=tomorrow", "not an ISO 8601"),
        (f"{GOOD} not_after=2030-01-01T00:00:00", "needs a zone"),
        (f"{GOOD} expires=2030-01-01T00:00:00Z", "not_after="),
        (f"{GOOD} a b", "at most one"),
        ("bad\x01token-0123456789abcdef", "16+ characters"),
    ],
)
def test_a_bad_token_line_is_named_by_number_never_echoed(line: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_tokens(f"{GOOD}\n{line}\n", "token file f")
    assert "token file f, line 2" in info.value.message and says in info.value.message
    assert GOOD not in info.value.message


def test_rotation_and_removal_take_effect_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{GOOD}\n")
    tokens = TokenSet(str(path), None, reload_interval_s=0.05)
    assert tokens.accepts(GOOD.encode()) and not tokens.accepts(OTHER.encode())
    path.write_text(f"{GOOD}\n{OTHER}\n")  # rotation: both for a while
    time.sleep(0.1)
    assert tokens.accepts(GOOD.encode()) and tokens.accepts(OTHER.encode())
    path.write_text(f"{OTHER}\n")  # the old one removed: refused at the next check
    time.sleep(0.1)
    assert not tokens.accepts(GOOD.encode()) and tokens.accepts(OTHER.encode())


def test_a_secret_volume_swap_is_seen(tmp_path: Path) -> None:
    """Kubernetes updates a Secret volume by pointing a symlink at a new directory."""
    for name, token in (("a", GOOD), ("b", OTHER)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokens").write_text(token + "\n")
    (tmp_path / "data").symlink_to("a")
    tokens = TokenSet(str(tmp_path / "data" / "tokens"), None, reload_interval_s=0.01)
    assert tokens.accepts(GOOD.encode())
    (tmp_path / "next").symlink_to("b")
    os.replace(tmp_path / "next", tmp_path / "data")
    time.sleep(0.05)
    assert tokens.accepts(OTHER.encode()) and not tokens.accepts(GOOD.encode())


def test_a_broken_rewrite_keeps_the_last_good_set(tmp_path: Path, caplog: Any) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{GOOD}\n")
    tokens = TokenSet(str(path), None, reload_interval_s=0.01)
    path.write_text("oops\n")
    time.sleep(0.05)
    with caplog.at_level(logging.ERROR):
        assert tokens.accepts(GOOD.encode())
    assert "keeping the last good set" in caplog.text and GOOD not in caplog.text
    path.unlink()
    time.sleep(0.05)
    assert tokens.accepts(GOOD.encode())


def test_a_token_past_not_after_is_refused(tmp_path: Path) -> None:
    now = [1_900_000_000.0]
    path = tmp_path / "tokens"
    path.write_text(f"{GOOD} not_after=2030-03-17T17:46:40Z\n{OTHER}\n")  # 1_900_000_000
    tokens = TokenSet(str(path), None, reload_interval_s=60, clock=lambda: now[0])
    now[0] -= 1
    assert tokens.accepts(GOOD.encode())
    now[0] += 1
    assert not tokens.accepts(GOOD.encode()) and tokens.accepts(OTHER.encode())


def test_env_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_MPSSERVE_TOKENS", f"{GOOD}\n{OTHER}")
    tokens = TokenSet(None, "TEST_MPSSERVE_TOKENS", reload_interval_s=1)
    assert len(tokens) == 2 and tokens.accepts(OTHER.encode())


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("Bearer abc", b"abc"),
        ("bearer   abc ", b"abc"),
        ("Basic abc", None),
        ("Bearer", None),
        (b"Bearer x", b"x"),
    ],
)
def test_bearer(header: str | bytes | None, token: bytes | None) -> None:
    assert bearer(header) == token


# -- config ----------------------------------------------------------------------------------


def service(ingress: dict[str, Any]) -> dict[str, Any]:
    return {"models": [{"name": "m", "store": "/s"}], "ingress": ingress}


def test_off_by_default_and_the_banner_says_so() -> None:
    config = IngressConfig()
    assert config.auth is None and config.tls is None
    assert "NO authentication and NO TLS" in describe(None, None)


def test_missing_files_are_named_at_load(tmp_path: Path) -> None:
    tls = {"cert_file": str(tmp_path / "nope.pem"), "key_file": str(tmp_path / "k.pem")}
    with pytest.raises(ConfigError) as info:
        parse_config(service({"tls": tls}))
    assert "ingress.tls.cert_file" in info.value.message and "No such file" in str(info.value)
    assert "ingress.tls.key_file" in info.value.message
    parse_config(service({"tls": tls}), check_files=False)  # for another machine: not looked at


def test_token_sources_are_checked_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"ingress.auth: .*token_file, token_env"):
        parse_config(service({"auth": {}}))
    with pytest.raises(ConfigError, match=r"ingress.auth.token_file: .*cannot read"):
        parse_config(service({"auth": {"token_file": str(tmp_path / "none")}}))
    bad = tmp_path / "bad"
    bad.write_text(f"{GOOD}\nshort\n")
    with pytest.raises(ConfigError, match="line 2"):
        parse_config(service({"auth": {"token_file": str(bad)}}))
    with pytest.raises(ConfigError, match=r"ingress.auth.token_env: .*not set"):
        parse_config(service({"auth": {"token_env": "TEST_MPSSERVE_UNSET"}}))
    with pytest.raises(ConfigError, match=r"ingress.auth.token_env: String should match"):
        parse_config(service({"auth": {"token_env": GOOD}}), check_files=False)
    monkeypatch.setenv("TEST_MPSSERVE_SET", GOOD)
    auth = parse_config(service({"auth": {"token_env": "TEST_MPSSERVE_SET"}})).ingress.auth
    assert auth is not None and auth.exempt_health and auth.reload_interval_s == 2.0
    with pytest.raises(ConfigError, match="Extra inputs"):
        parse_config(service({"auth": {"token_env": "X", "token": GOOD}}), check_files=False)


def test_relative_paths_resolve_from_the_config_file(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "tokens").write_text(GOOD + "\n")
    for name in ("server.pem", "server.key", "ca.pem"):
        (tmp_path / name).write_bytes((pki.ca.parent / name).read_bytes())
    tls = {"cert_file": "server.pem", "key_file": "server.key", "client_ca_file": "ca.pem"}
    body = service({"auth": {"token_file": "tokens"}, "tls": tls})
    (tmp_path / "service.yaml").write_text(json.dumps(body))
    config = load_config(tmp_path / "service.yaml").ingress
    assert config.auth is not None and config.auth.token_file == str(tmp_path / "tokens")
    assert config.tls is not None and config.tls.client_ca_file == str(tmp_path / "ca.pem")


def test_unparseable_certificates_fail_at_startup_naming_the_field(
    tmp_path: Path, pki: Pki
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"ingress.tls.cert_file / key_file"):
        server_ssl_context(IngressTls(cert_file=str(junk), key_file=str(pki.server_key)))
    with pytest.raises(ConfigError, match=r"ingress.tls.client_ca_file"):
        grpc_server_credentials(
            IngressTls(
                cert_file=str(pki.server_cert),
                key_file=str(pki.server_key),
                client_ca_file=str(junk),
            )
        )


def test_unauthenticated_maps_to_401_and_unauthenticated() -> None:
    status, code, _ = to_status(Unauthenticated("x"))
    assert status == 401 and code == GrpcCode.UNAUTHENTICATED
    assert code.name in grpc.StatusCode.__members__


# -- real servers on loopback: token + TLS + mutual TLS ---------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Served:
    def __init__(self, http_port: int, grpc_port: int, pki: Pki, tokens: Path) -> None:
        self.http_port, self.grpc_port, self.pki, self.tokens = http_port, grpc_port, pki, tokens
        self.refused: list[tuple[str, str]] = []
        self.backend = echo_backend()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    def post(self, token: str | None, body: bytes, cert: bool = True) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(
            f"{self.url}/v2/models/echo/infer",
            data=body,
            headers=headers,
            verify=str(self.pki.ca),
            cert=(str(self.pki.client_cert), str(self.pki.client_key)) if cert else None,
            timeout=10,
        )

    def channel(self, client_cert: bool = True) -> grpc.Channel:
        pki = self.pki
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.client_key.read_bytes() if client_cert else None,
            certificate_chain=pki.client_cert.read_bytes() if client_cert else None,
        )
        return grpc.secure_channel(f"127.0.0.1:{self.grpc_port}", credentials)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def served(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"{GOOD}\n")
    tls = IngressTls(
        cert_file=str(pki.server_cert), key_file=str(pki.server_key), client_ca_file=str(pki.ca)
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    out = Served(sock.getsockname()[1], free_port(), pki, tokens)
    plane = DataPlane({"echo": out.backend}, max_request_bytes=64 << 20, request_timeout_s=10)

    def account(model: str, protocol: str, rid: str | None, exc: Any, started: float) -> None:
        out.refused.append((model, protocol))
        plane.rejected(model, protocol, rid, exc, started)

    auth = Authenticator.of(
        IngressAuth(token_file=str(tokens), reload_interval_s=0.05), refused_now(account)
    )
    config = uvicorn.Config(
        create_http_app(plane),
        http=guarded_protocol(LIMITS, auth),
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    config.load()
    config.ssl = server_ssl_context(tls)
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()
    limits = GrpcLimits(64 << 20, 8192, 2.0, 16, 10, 8, 5.0, None, 60.0, 10.0)
    grpc_server = loop.run_until_complete(
        start_grpc_server(
            plane,
            "127.0.0.1",
            out.grpc_port,
            limits,
            grpc_server_credentials(tls),
            [AuthInterceptor(auth)],
        )
    )
    task = loop.create_task(server.serve([sock]))
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield out
    server.should_exit = True
    asyncio.run_coroutine_threadsafe(grpc_server.stop(0), loop).result(10)
    while not task.done():
        time.sleep(0.01)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
    sock.close()


BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]})


def test_right_token_and_certificate_infer(served: Served) -> None:
    answer = served.post(GOOD, BODY.encode())
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [2.0, 4.0]


@pytest.mark.parametrize("token", [None, OTHER])
def test_no_or_wrong_token_gets_401_before_inference(served: Served, token: str | None) -> None:
    calls = served.backend.calls
    answer = served.post(token, BODY.encode())
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="mpsserve"')
    assert ("invalid_token" in answer.headers["WWW-Authenticate"]) == (token is not None)
    assert "bearer token" in answer.json()["error"]
    assert served.backend.calls == calls and served.refused[-1] == ("echo", "http")


def test_every_route_needs_the_token_but_health(served: Served) -> None:
    cert = (str(served.pki.client_cert), str(served.pki.client_key))
    for path, status in (
        ("/v2/health/live", 200),
        ("/v2/health/ready", 200),
        ("/-/healthz", 200),
        ("/v2", 401),
        ("/v2/models/echo", 401),
        ("/v2/health/live/../../v2", 401),
        ("/nope", 401),
    ):
        answer = requests.get(served.url + path, verify=str(served.pki.ca), cert=cert, timeout=5)
        assert answer.status_code == status, path


def test_refused_body_is_never_read(served: Served) -> None:
    """A 50 MB Content-Length with a wrong token: 401 at once, with no byte of body sent."""
    context = ssl.create_default_context(cafile=str(served.pki.ca))
    context.load_cert_chain(str(served.pki.client_cert), str(served.pki.client_key))
    with (
        socket.create_connection(("127.0.0.1", served.http_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        started = time.monotonic()
        sock.sendall(
            b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800\r\n"
            + f"Authorization: Bearer {OTHER}\r\n\r\n".encode()
        )
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 401") and time.monotonic() - started < 1.0


def test_keep_alive_request_after_a_good_one_is_refused_with_401(served: Served) -> None:
    with requests.Session() as session:  # verify per request: REQUESTS_CA_BUNDLE wins over
        session.cert = (str(served.pki.client_cert), str(served.pki.client_key))  # the session's
        url, ca = f"{served.url}/v2/models/echo/infer", str(served.pki.ca)
        good = {"Authorization": f"Bearer {GOOD}"}
        assert session.post(url, data=BODY, headers=good, verify=ca).ok
        assert session.post(url, data=BODY, verify=ca).status_code == 401


def test_no_client_certificate_fails_the_handshake(served: Served) -> None:
    """Under TLS 1.3 the client learns it from an alert after its own handshake finished:
    an SSL error or a closed connection, never an answer."""
    calls = served.backend.calls
    with pytest.raises(requests.exceptions.ConnectionError):
        served.post(GOOD, BODY.encode(), cert=False)
    rogue = (str(served.pki.rogue_cert), str(served.pki.rogue_key))
    assert served.backend.calls == calls
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{served.url}/v2", verify=str(served.pki.ca), cert=rogue, timeout=5)


def test_plain_http_to_the_tls_port_is_refused(served: Served) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{served.http_port}/v2/health/live", timeout=5)


def test_rotation_on_a_running_server(served: Served) -> None:
    served.tokens.write_text(f"{GOOD}\n{OTHER}\n")
    time.sleep(0.1)
    assert served.post(OTHER, BODY.encode()).status_code == 200
    served.tokens.write_text(f"{OTHER}\n")
    time.sleep(0.1)
    assert served.post(GOOD, BODY.encode()).status_code == 401
    served.tokens.write_text(f"{GOOD}\n")
    time.sleep(0.1)


def grpc_stubs() -> tuple[Any, Any]:
    from mpsserve.protocol import grpc_service_pb2 as pb
    from mpsserve.protocol import grpc_service_pb2_grpc as pb_grpc

    return pb, pb_grpc


def test_grpc_token_and_mutual_tls(served: Served) -> None:
    pb, pb_grpc = grpc_stubs()
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP32", shape=[2])
    request.raw_input_contents.append(b"\0" * 8)
    with served.channel() as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        good = (("authorization", f"Bearer {GOOD}"),)
        assert stub.ModelInfer(request, metadata=good, timeout=10).model_name == "echo"
        for metadata in ((), (("authorization", f"Bearer {OTHER}"),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert served.refused[-1] == ("-", "grpc")
            with pytest.raises(grpc.RpcError):
                stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata, timeout=10)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live  # probes: exempt
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def test_grpc_with_call_credentials(served: Served) -> None:
    """grpcio's own way: channel credentials composed with an access token."""
    pb, pb_grpc = grpc_stubs()
    pki = served.pki
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(
            pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
        ),
        grpc.access_token_call_credentials(GOOD),
    )
    with grpc.secure_channel(f"127.0.0.1:{served.grpc_port}", credentials) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).name == "mpsserve"


def test_grpc_without_client_certificate_fails(served: Served) -> None:
    pb, pb_grpc = grpc_stubs()
    with served.channel(client_cert=False) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ServerLive(pb.ServerLiveRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_auth_off_installs_nothing() -> None:
    protocol = guarded_protocol(LIMITS)
    assert protocol.auth is None
