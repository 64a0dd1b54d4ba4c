"""TensorFlow Serving's gRPC API on the ingress's gRPC port, beside KServe v2.

``tensorflow.serving.PredictionService`` (Predict, GetModelMetadata) and
``tensorflow.serving.ModelService`` (GetModelStatus), so a TF Serving client (its
``PredictionServiceStub``) works unchanged against the same port as tritonclient. Each method
only translates (``protocol.tfserving_grpc``) and calls the ``DataPlane``, as the KServe
servicer does; errors propagate to ``grpc.ErrorInterceptor``, mapped once by
``errors.to_status``. RPCs of those services that are not served (Classify, Regress,
MultiInference, HandleReloadConfigRequest) answer UNIMPLEMENTED.

The messages come from a private descriptor pool (``protocol.tfserving_pb``), so the handlers
are registered as generic ones with the classes' own (de)serialisers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from mpsserve.ingress.dataplane import DataPlane
from mpsserve.ingress.grpc_infer import infer_rpc
from mpsserve.protocol import tfserving_grpc as codec
from mpsserve.protocol import tfserving_pb as pb

PROTOCOL = "tfserving_grpc"  # the ``protocol`` label of its requests in metrics and the log


class TfServingServicer:
    """The served RPCs of TF Serving's two services; what each returns is TF Serving's."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        _, result = await infer_rpc(
            self.dataplane,
            context,
            PROTOCOL,
            request.model_spec.name,
            request.ByteSize,
            lambda: codec.model_name(request.model_spec),
            lambda: codec.decode_predict(request),
        )
        return codec.encode_predict(result)

    async def GetModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = request.model_spec
        codec.check_metadata_fields(request.metadata_field)
        metadata = await self.dataplane.model_metadata(
            codec.model_name(spec), codec.requested_version(spec)
        )
        return codec.metadata_response(metadata)

    async def GetModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = request.model_spec
        version = codec.requested_version(spec)
        metadata = await self.dataplane.model_metadata(codec.model_name(spec))
        return codec.status_response(codec.served_versions(metadata, version))


def add_tfserving_services(server: grpc.aio.Server, dataplane: DataPlane) -> None:
    """Register TF Serving's PredictionService and ModelService on ``server``."""
    servicer = TfServingServicer(dataplane)
    by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for (service, method), (request_class, response_class) in pb.RPCS.items():
        handler: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]] = getattr(
            servicer, method
        )
        by_service.setdefault(service, {})[method] = grpc.unary_unary_rpc_method_handler(
            handler,
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(s, m) for s, m in by_service.items()]
    )
