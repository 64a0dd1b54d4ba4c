"""gRPC errors are mapped at one place: ``ingress.grpc.ErrorInterceptor``.

A real grpc.aio server on loopback with the interceptor in front of a generic handler whose
method raises what the test asks for; a real channel calls it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from mpsserve.errors import GENERIC_INTERNAL_MESSAGE, ModelNotFound, PayloadTooLarge
from mpsserve.ingress.grpc import ErrorInterceptor

RAISE: dict[str, BaseException | None] = {}


async def _method(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    exc = RAISE.get("exc")
    if isinstance(exc, grpc.StatusCode):
        await context.abort(exc, "chosen by the method")
    if exc is not None:
        raise exc
    return b"ok:" + request


def _identity(data: bytes) -> bytes:
    return data


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    loop = asyncio.new_event_loop()
    handler = grpc.method_handlers_generic_handler(
        "test.Svc",
        {"Do": grpc.unary_unary_rpc_method_handler(_method, _identity, _identity)},
    )

    async def start() -> tuple[Any, int]:
        server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        server.add_generic_rpc_handlers((handler,))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server, port

    server, port = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def call(channel: grpc.Channel) -> Any:
    return channel.unary_unary("/test.Svc/Do", _identity, _identity)


def _status(call: Any, exc: Any) -> tuple[grpc.StatusCode, str]:
    RAISE["exc"] = exc
    with pytest.raises(grpc.RpcError) as info:
        call(b"x", timeout=10)
    return info.value.code(), info.value.details()


def test_success_passes_through(call: Any) -> None:
    RAISE["exc"] = None
    assert call(b"x", timeout=10) == b"ok:x"


def test_service_errors_get_their_code_and_message(call: Any) -> None:
    assert _status(call, ModelNotFound("no model 'm'")) == (
        grpc.StatusCode.NOT_FOUND,
        "no model 'm'",
    )
    assert _status(call, PayloadTooLarge("big"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_errors_answer_internal_without_internals(
    call: Any, caplog: pytest.LogCaptureFixture
) -> None:
    code, details = _status(call, RuntimeError("secret /path/in/traceback"))
    assert (code, details) == (grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE)
    assert any("secret" in str(r.exc_info) for r in caplog.records if r.exc_info)


def test_a_status_the_method_chose_is_kept(call: Any) -> None:
    assert _status(call, grpc.StatusCode.PERMISSION_DENIED) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "chosen by the method",
    )


def test_unknown_methods_stay_unimplemented(channel: grpc.Channel) -> None:
    channel_call = channel.unary_unary("/test.Svc/Nope", _identity, _identity)
    with pytest.raises(grpc.RpcError) as info:
        channel_call(b"x", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
