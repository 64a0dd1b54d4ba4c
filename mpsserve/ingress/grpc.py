"""The gRPC server of an ingress: its bounds, the one error interceptor, and its start.

The RPCs themselves are ``grpc_servicer.InferenceServicer`` (typed, translation only); every
error they raise is mapped here, once, by ``ErrorInterceptor`` through ``errors.to_status``
(the same code and message as REST). The servicer module imports the generated stubs, so it is
imported only when a server starts (see its docstring).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from mpsserve.errors import to_status
from mpsserve.ingress.dataplane import DataPlane

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Errors mapped at one place: an exception a unary RPC raises becomes the status and
    details ``to_status`` gives (an unknown one is logged there and answers INTERNAL).

    Innermost of the server's interceptors, so it wraps only the servicer's handlers: a
    refusal an outer interceptor makes (the token check) is its own. Each method's wrapped
    handler is built once and kept (the registered methods are a fixed set)."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = self._handlers.get(details.method)
        if handler is None:
            handler = await continuation(details)
            if handler is None or handler.unary_unary is None:
                return handler  # unknown method (UNIMPLEMENTED) or a stream: not ours
            handler = grpc.unary_unary_rpc_method_handler(
                map_errors(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            self._handlers[details.method] = handler
        return handler


def map_errors(method: Handler) -> Handler:
    """``method`` with every exception it raises answered as ``to_status`` maps it."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(request, context)
        except grpc.aio.AbortError:
            raise  # the method chose its status itself
        except Exception as exc:
            _, code, message = to_status(exc)
            await context.abort(grpc.StatusCode[code.name], message)

    return call


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
    reflection: bool = False,
) -> Any:
    """A started grpc.aio server for KServe v2 on ``host:port`` (SO_REUSEPORT, so every
    ingress replica on the node shares the port). Inference past the data plane's in-flight
    bound is refused with UNAVAILABLE (``DataPlane.admission``); grpc's own RPC cap, a little
    higher so health RPCs still pass, answers RESOURCE_EXHAUSTED. ``credentials``: TLS
    (``auth.grpc_server_credentials``), else an insecure port; ``interceptors``: the token
    check when ``ingress.auth`` is on; ``ErrorInterceptor`` is always the innermost.
    ``grpc.health.v1.Health`` is always served (``add_health``); server reflection only with
    ``reflection`` (``ingress.grpc_reflection``)."""
    from mpsserve.ingress.grpc_servicer import InferenceServicer
    from mpsserve.ingress.tfserving_grpc import add_tfserving_services
    from mpsserve.protocol import grpc_service_pb2_grpc

    server = grpc.aio.server(
        options=server_options(limits),
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        interceptors=[*interceptors, ErrorInterceptor()],
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(dataplane), server
    )
    add_tfserving_services(server, dataplane)  # TF Serving's gRPC API on the same port
    await add_health(server, dataplane)
    if reflection:
        add_reflection(server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"gRPC cannot bind {address}")
    await server.start()
    return server


async def add_health(server: grpc.aio.Server, dataplane: DataPlane) -> None:
    """The standard ``grpc.health.v1.Health`` (Check and Watch, what Kubernetes' gRPC probes
    and load balancers call): service "" is the server (SERVING when every model has a
    replica to route to), a model's name is that model (SERVING when a replica serves a
    version of it); kept current by the data plane's ``HealthBoard``, the first look taken
    before the port opens."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.aio.HealthServicer()
    status = health_pb2.HealthCheckResponse

    async def publish(name: str, serving: bool) -> None:
        await servicer.set(name, status.SERVING if serving else status.NOT_SERVING)

    board = dataplane.health
    board.listeners.append(publish)
    for name, serving in (await board.refresh()).items():
        await publish(name, serving)
    board.start()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def add_reflection(server: grpc.aio.Server) -> None:
    """gRPC server reflection (v1alpha, what grpcurl asks) for the services served here."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection

    from mpsserve.protocol import grpc_service_pb2

    names = [
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(names, server)
