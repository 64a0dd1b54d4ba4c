"""The ingress's HTTP guard and sanitising against a real uvicorn on loopback (no Ray): a
stand-in backend, the real app, the real protocol class, raw sockets as the abusive peer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
import uvicorn

from mpsserve.errors import to_status
from mpsserve.ingress.dataplane import DataPlane, client_request_id, log_access
from mpsserve.ingress.guard import LINGER_S, GuardLimits, guarded_protocol
from mpsserve.ingress.http import create_http_app
from mpsserve.text import log_field, quote, valid_request_id
from tests.echo import Gate, echo_backend

LIMITS = GuardLimits(
    header_timeout_s=0.5,
    body_idle_timeout_s=0.5,
    max_header_bytes=4096,
    max_headers=20,
    max_connections=8,
    max_body_bytes=1 << 20,
    retry_after_s=2,
)


class Served:
    def __init__(self, port: int, gate: Gate, loop: asyncio.AbstractEventLoop) -> None:
        self.port, self.gate, self.loop = port, gate, loop

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    gate = Gate()
    plane = DataPlane(
        {"echo": echo_backend(gate)},
        max_request_bytes=1 << 20,
        request_timeout_s=10,
        max_in_flight=4,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        create_http_app(plane, retry_after_s=2),
        http=guarded_protocol(LIMITS),
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_keep_alive=1,
    )
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve([sock]),))
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield Served(sock.getsockname()[1], gate, loop)
    server.should_exit = True
    thread.join(10)
    loop.close()
    sock.close()


def good_body(x: list[float] | None = None) -> bytes:
    entry = {"name": "x", "datatype": "FP32", "shape": [3], "data": x or [1.0, 2.0, 3.0]}
    return json.dumps({"inputs": [entry]}).encode()


def infer(served: Served, body: bytes, **headers: str) -> requests.Response:
    return requests.post(
        f"{served.url}/v2/models/echo/infer", data=body, headers=headers, timeout=5
    )


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def error_of(raw: bytes) -> str:
    return str(json.loads(raw.split(b"\r\n\r\n", 1)[1])["error"])


def test_slowloris_headers_get_408_within_the_header_timeout(served: Served) -> None:
    with served.connect() as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\n")
        raw = read_all(sock)
    assert status_of(raw) == 408 and "headers not complete" in error_of(raw)
    assert time.monotonic() - started < LIMITS.header_timeout_s + 1


def test_silent_connection_is_closed(served: Served) -> None:
    with served.connect() as sock:
        started = time.monotonic()
        read_all(sock)
    assert time.monotonic() - started < LIMITS.header_timeout_s + 1


def test_a_body_that_stops_arriving_gets_408(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(
            b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
        )
        started = time.monotonic()
        raw = read_all(sock)
    assert status_of(raw) == 408 and "no request body bytes" in error_of(raw)
    assert time.monotonic() - started < LIMITS.body_idle_timeout_s + 1


def test_a_body_that_keeps_arriving_is_not_cut(served: Served) -> None:
    body = good_body()
    with served.connect() as sock:
        head = f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        sock.sendall(head.encode() + b"Connection: close\r\n\r\n")
        for index in range(0, len(body), 10):  # 0.3 s apart, each gap under the timeout
            sock.sendall(body[index : index + 10])
            time.sleep(0.3 if index < 40 else 0)
        raw = read_all(sock)
    assert status_of(raw) == 200


@pytest.mark.parametrize(
    "head",
    [b"X-Big: " + b"a" * 8000 + b"\r\n", b"".join(b"X-%d: 1\r\n" % i for i in range(30))],
    ids=["size", "count"],
)
def test_large_or_many_headers_get_431(served: Served, head: bytes) -> None:
    with served.connect() as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        raw = read_all(sock)
    assert status_of(raw) == 431 and "header" in error_of(raw)


def test_header_of_megabytes_gets_431_not_an_answer(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nX-Big: ")
        with contextlib.suppress(OSError):  # the server may close while we still send
            for _ in range(128):  # 8 MiB of one header value
                sock.sendall(b"a" * 65536)
        raw = read_all(sock)
    assert status_of(raw) == 431


def test_connections_over_the_cap_get_503_with_retry_after(served: Served) -> None:
    time.sleep(LINGER_S + 0.5)  # refused connections of earlier tests are gone
    held = [served.connect() for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.1)
        with served.connect() as sock:
            raw = read_all(sock)
        assert status_of(raw) == 503 and b"retry-after: 2" in raw.lower()
        assert "most connections" in error_of(raw)
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert infer(served, good_body()).status_code == 200


def send_chunked(sock: socket.socket, path: str, mib: int) -> int:
    """Offer ``mib`` MiB as a chunked body; the MiB sent before the server closed."""
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"100000\r\n" + b"1" * (1 << 20) + b"\r\n"
    for sent in range(mib):
        try:
            sock.sendall(chunk)
        except OSError:
            return sent
    return mib


@pytest.mark.parametrize("path", ["/v2/models/echo/infer", "/v1/models/echo:predict"])
def test_chunked_body_over_the_limit_is_413_before_it_is_all_sent(
    served: Served, path: str
) -> None:
    with served.connect() as sock:
        sent = send_chunked(sock, path, 64)  # 64 MiB offered, 1 MiB allowed
        raw = read_all(sock)
    assert status_of(raw) == 413 and "the limit is" in error_of(raw)
    assert sent >= 1  # refused after the limit's worth of bytes, not at the headers


def test_declared_length_over_the_limit_is_413_at_once(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(
            b"POST /v1/models/echo:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 60000000\r\n\r\n"
        )
        raw = read_all(sock)
    assert status_of(raw) == 413 and "the limit is" in error_of(raw)


def test_requests_over_the_in_flight_bound_get_503_at_once(served: Served) -> None:
    gate = asyncio.Event()
    served.gate.event = gate
    try:
        held = [threading.Thread(target=infer, args=(served, good_body())) for _ in range(4)]
        for thread in held:
            thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        response = infer(served, good_body())
        assert response.status_code == 503 and response.headers["Retry-After"] == "2"
        assert "in flight" in response.json()["error"]
        assert time.monotonic() - started < 1
        assert requests.get(f"{served.url}/v2/health/live", timeout=5).status_code == 200
    finally:
        served.loop.call_soon_threadsafe(gate.set)
        for thread in held:
            thread.join(5)
        served.gate.event = None
    assert infer(served, good_body()).status_code == 200


@pytest.mark.parametrize("bad", ["a\r\nX-Injected: 1", "x" * 129, "caf\u00e9", "a b"])
def test_bad_request_ids_are_replaced(served: Served, bad: str) -> None:
    body = json.dumps({"id": bad, "inputs": [json.loads(good_body())["inputs"][0]]}).encode()
    response = infer(served, body)
    assert response.status_code == 200
    assert valid_request_id(response.headers["X-Request-ID"])
    assert "X-Injected" not in response.headers


def test_crlf_in_request_id_header_gets_an_answer(served: Served) -> None:
    with served.connect() as sock:
        body = good_body()
        sock.sendall(
            b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\rb\x01\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        raw = read_all(sock)
    assert status_of(raw) in (200, 400)  # answered either way, never silence


def test_huge_integer_is_a_400_naming_the_input(served: Served) -> None:
    body = good_body().replace(b"1.0", b"1" * 5000)
    response = infer(served, body)
    assert response.status_code == 400
    assert '"x"' in response.json()["error"] and "digits" in response.json()["error"]


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_json_tokens_are_a_400_on_v2(served: Served, token: bytes) -> None:
    response = infer(served, good_body().replace(b"2.0", token))
    assert response.status_code == 400 and "NaN or Infinity" in response.json()["error"]


def test_float_overflowing_fp32_is_a_400(served: Served) -> None:
    response = infer(served, good_body().replace(b"2.0", b"1e39"))
    assert response.status_code == 400 and "out of range for FP32" in response.json()["error"]


def test_tfserving_accepts_non_finite_tokens(served: Served) -> None:
    body = b'{"inputs": {"x": [1.0, NaN, Infinity]}}'
    response = requests.post(f"{served.url}/v1/models/echo:predict", data=body, timeout=5)
    assert response.status_code == 200
    assert response.text.count("NaN") == 1


def test_long_model_name_is_quoted_truncated(served: Served) -> None:
    name = "m" * 3000
    response = requests.post(f"{served.url}/v2/models/{name}/infer", data=b"{}", timeout=5)
    assert response.status_code == 404
    error = response.json()["error"]
    assert "'" + "m" * 64 + "...'" in error and len(error) < 200


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/nowhere"])
def test_framework_pages_are_off_and_errors_are_json(served: Served, path: str) -> None:
    response = requests.get(served.url + path, timeout=5)
    assert response.status_code == 404 and "error" in response.json()


def test_unparseable_request_is_a_json_400(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
        raw = read_all(sock)
    assert status_of(raw) == 400 and error_of(raw)


# -- the pure parts ------------------------------------------------------------------------


def test_request_id_rules() -> None:
    assert client_request_id(None) is None and client_request_id("") is None
    assert client_request_id("abc-123_X") == "abc-123_X"
    replaced = client_request_id("a\nb")
    assert replaced is not None and replaced != "a\nb" and valid_request_id(replaced)
    assert valid_request_id("x" * 128) and not valid_request_id("x" * 129)


def test_quote_and_log_field_escape() -> None:
    assert quote("a" * 100) == '"' + "a" * 64 + '..."'
    assert quote('x"\r\n') == '"x\\"\\r\\n"'
    assert log_field("ok-1") == "ok-1"
    assert "\n" not in log_field("a\nstatus=200 b") and " " not in log_field("a b")


def test_access_log_line_cannot_be_split(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="mpsserve.access"):
        log_access("id", "m", "1\r\nrequest_id=forged status=200", "http", 1, 200, 0.01)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "mpsserve.access"]
    assert "\n" not in line and "\r" not in line and line.count(" status=") == 1


def test_error_messages_are_bounded() -> None:
    from mpsserve.errors import InvalidInput

    assert len(to_status(InvalidInput("x" * 100_000))[2]) < 2100


# -- connection budget and gRPC --------------------------------------------------------------


def test_connection_caps_stay_within_the_file_limit() -> None:
    from mpsserve.config import IngressConfig
    from mpsserve.serving.ingress import connection_caps

    config = IngressConfig()
    assert connection_caps(config, 1_000_000) == (4096, 1024)
    http_cap, grpc_cap = connection_caps(config, 1024)
    assert http_cap + grpc_cap <= 0.8 * 1024 and grpc_cap <= 1024 * 0.8 / 4


def test_limits_are_strict_config() -> None:
    from pydantic import ValidationError

    from mpsserve.config import IngressConfig

    with pytest.raises(ValidationError):
        IngressConfig.model_validate({"limits": {"header_timeout": 5}})
    assert IngressConfig().limits.max_in_flight_requests == 256 and not IngressConfig().api_docs


def test_grpc_long_model_name_and_bad_request_id() -> None:
    import grpc

    from mpsserve.ingress.grpc import GrpcLimits
    from mpsserve.protocol import grpc_service_pb2 as pb
    from mpsserve.protocol import grpc_service_pb2_grpc as pb_grpc
    from tests.grpc_server import grpc_server_thread

    limits = GrpcLimits(1 << 20, 8192, 1.0, 16, 10, 8, 5.0, None, 60.0, 10.0)
    plane = DataPlane({"echo": echo_backend()}, 1 << 20, 10, max_in_flight=4)
    with grpc_server_thread(plane, limits) as port:
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        request = pb.ModelInferRequest(model_name="m" * (1 << 20))
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "m" * 64 + "..." in info.value.details()
        request = pb.ModelInferRequest(model_name="echo", id="a\r\nb")
        request.inputs.add(name="x", datatype="FP32", shape=[2])
        request.raw_input_contents.append(b"\0" * 8)
        _, call = stub.ModelInfer.with_call(request, timeout=10)
        (item,) = [m for m in call.trailing_metadata() if m.key == "x-request-id"]
        assert valid_request_id(item.value)
