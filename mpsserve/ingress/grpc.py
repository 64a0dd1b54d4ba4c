"""The gRPC adapter: KServe v2 ``inference.GRPCInferenceService`` over a ``DataPlane``.

The ingress's grpc.aio server calls the method named after each RPC; these functions only
translate messages and map errors through ``errors.to_status`` (same message as REST).

The generated stubs are imported lazily: Triton's client registers the same ``inference.*``
protobuf symbols, and a process that imports ours only to build the Serve app (a test, the
CLI) must not collide with it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from mpsserve.errors import MpsServeError, to_status
from mpsserve.ingress.dataplane import DataPlane, client_request_id, request_id_for

RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")


def _pb2() -> Any:
    from mpsserve.protocol import grpc_service_pb2

    return grpc_service_pb2


REQUEST_ID = "x-request-id"


def _metadata(context: Any, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return str(item.value)
    return None


class GrpcAdapter:
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def call(self, rpc: str, request: Any, context: Any) -> Any:
        """Run one RPC; on error set the status on ``context`` and return an empty reply."""
        handler: Callable[[Any, Any], Awaitable[Any]] = getattr(self, f"_{rpc}")
        try:
            return await handler(request, context)
        except Exception as exc:
            _, code, message = to_status(exc)
            context.set_code(grpc.StatusCode[code.name])
            context.set_details(message)
            return getattr(_pb2(), f"{rpc}Response")()

    async def _ServerLive(self, request: Any, context: Any) -> Any:
        return _pb2().ServerLiveResponse(live=self.dataplane.live())

    async def _ServerReady(self, request: Any, context: Any) -> Any:
        return _pb2().ServerReadyResponse(ready=await self.dataplane.ready())

    async def _ModelReady(self, request: Any, context: Any) -> Any:
        ready = await self.dataplane.model_ready(request.name, request.version or None)
        return _pb2().ModelReadyResponse(ready=ready)

    async def _ServerMetadata(self, request: Any, context: Any) -> Any:
        from mpsserve.protocol.kserve_grpc import server_metadata_response

        return server_metadata_response(self.dataplane.server_metadata())

    async def _ModelMetadata(self, request: Any, context: Any) -> Any:
        from mpsserve.protocol.kserve_grpc import model_metadata_response

        metadata = await self.dataplane.model_metadata(request.name, request.version or None)
        return model_metadata_response(metadata)

    async def _ModelInfer(self, request: Any, context: Any) -> Any:
        started, request_id = time.perf_counter(), client_request_id(_metadata(context, REQUEST_ID))
        with self.dataplane.admission(request.model_name, "grpc", request_id):
            return await self._infer(request, context, started, request_id)

    async def _infer(
        self, request: Any, context: Any, started: float, request_id: str | None
    ) -> Any:
        from mpsserve.protocol.kserve_grpc import decode_infer_request, encode_infer_response

        # The tensors' bytes are the message's size: cheaper than ByteSize(), which walks it;
        # the server's max_receive_message_length bounds the rest.
        try:
            self.dataplane.check_size(sum(len(raw) for raw in request.raw_input_contents))
            self.dataplane.backend(request.model_name)  # unknown model: NOT_FOUND first
            decoded = decode_infer_request(request)
        except MpsServeError as exc:
            self.dataplane.rejected(request.model_name, "grpc", request_id, exc, started)
            raise
        request_id = request_id_for(request_id, decoded.id)
        context.set_trailing_metadata(((REQUEST_ID, request_id),))  # no frame of its own
        result = await self.dataplane.infer(decoded, "grpc", request_id)
        return encode_infer_response(result, decoded)


class _Servicer:
    """``GRPCInferenceService``'s methods, each one a call of the adapter."""

    def __init__(self, adapter: GrpcAdapter) -> None:
        for rpc in RPCS:
            setattr(self, rpc, _rpc(adapter, rpc))


def _rpc(adapter: GrpcAdapter, rpc: str) -> Callable[[Any, Any], Awaitable[Any]]:
    async def method(request: Any, context: Any) -> Any:
        return await adapter.call(rpc, request, context)

    return method


@dataclass(frozen=True)
class GrpcLimits:
    """The gRPC server's bounds (``IngressLimits``' grpc_* fields, in its units)."""

    max_bytes: int
    max_metadata_bytes: int
    handshake_timeout_s: float
    max_connections: int
    max_concurrent_streams: int
    max_concurrent_rpcs: int
    idle_timeout_s: float
    max_connection_age_s: float | None
    keepalive_s: float
    min_ping_interval_s: float


def server_options(limits: GrpcLimits) -> list[tuple[str, int]]:
    """grpc core's channel arguments for a server facing untrusted clients: a handshake
    deadline (a silent TCP peer), metadata, stream and connection bounds, idle connections
    closed, dead peers found by pings, and clients that ping too often sent away."""
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    limit = limits.max_bytes + 2**20  # room for the message's own fields; check_size is exact
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 1),
        ("grpc.max_metadata_size", limits.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", limits.max_metadata_bytes),
        ("grpc.server_handshake_timeout_ms", ms(limits.handshake_timeout_s)),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        ("grpc.max_connection_idle_ms", ms(limits.idle_timeout_s)),
        ("grpc.keepalive_time_ms", ms(limits.keepalive_s)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(limits.min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if limits.max_connection_age_s is not None:
        options.append(("grpc.max_connection_age_ms", ms(limits.max_connection_age_s)))
        options.append(("grpc.max_connection_age_grace_ms", 30_000))
    return options


async def start_grpc_server(
    dataplane: DataPlane,
    host: str,
    port: int,
    limits: GrpcLimits,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> Any:
    """A started grpc.aio server for KServe v2 on ``host:port`` (SO_REUSEPORT, so every
    ingress replica on the node shares the port). Inference past the data plane's in-flight
    bound is refused with UNAVAILABLE (``DataPlane.admission``); grpc's own RPC cap, a little
    higher so health RPCs still pass, answers RESOURCE_EXHAUSTED. ``credentials``: TLS
    (``auth.grpc_server_credentials``), else an insecure port; ``interceptors``: the token
    check when ``ingress.auth`` is on (none otherwise: nothing runs per call)."""
    from mpsserve.protocol import grpc_service_pb2_grpc

    server = grpc.aio.server(
        options=server_options(limits),
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        interceptors=list(interceptors) or None,
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        _Servicer(GrpcAdapter(dataplane)), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"gRPC cannot bind {address}")
    await server.start()
    return server
