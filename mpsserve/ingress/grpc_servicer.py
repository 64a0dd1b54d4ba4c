"""KServe v2's ``inference.GRPCInferenceService``: a typed servicer over a ``DataPlane``.

Each method only translates messages (``protocol.kserve_grpc``) and calls the data plane, the
same functions the REST adapter calls. Errors are not handled here: they propagate to
``grpc.ErrorInterceptor``, the one place that maps them (``errors.to_status``), so a method
cannot answer an error differently from its neighbours or from REST.

This module imports the generated stubs at the top, so only ``grpc.start_grpc_server`` imports
it (lazily): Triton's client registers the same ``inference.*`` protobuf symbols, and a process
that imports the ingress only to build the Serve app (a test, the CLI) must not collide with it.
"""

from __future__ import annotations

import grpc

from mpsserve.ingress.dataplane import DataPlane
from mpsserve.ingress.grpc_infer import infer_rpc
from mpsserve.protocol import grpc_service_pb2 as pb
from mpsserve.protocol import kserve_grpc
from mpsserve.protocol.grpc_service_pb2_grpc import GRPCInferenceServiceServicer


class InferenceServicer(GRPCInferenceServiceServicer):
    """Every RPC of ``grpc_service.proto``; what each returns is the REST endpoint's answer."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.dataplane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        ready = await self.dataplane.model_ready(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return kserve_grpc.server_metadata_response(self.dataplane.server_metadata())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        metadata = await self.dataplane.model_metadata(request.name, request.version or None)
        return kserve_grpc.model_metadata_response(metadata)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        decoded, result = await infer_rpc(
            self.dataplane,
            context,
            "grpc",
            request.model_name,
            # The tensors' bytes are the message's size: cheaper than ByteSize(), which walks
            # it; the server's max_receive_message_length bounds the rest.
            lambda: sum(len(raw) for raw in request.raw_input_contents),
            lambda: request.model_name,
            lambda: kserve_grpc.decode_infer_request(request),
        )
        return kserve_grpc.encode_infer_response(result, decoded)

    # -- Triton's extensions (ingress.extensions) -------------------------------------------

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        extensions = self.dataplane.extensions
        config = await extensions.model_config(request.name, request.version or None)
        return kserve_grpc.model_config_response(config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        extensions = self.dataplane.extensions
        stats = await extensions.statistics(request.name or None, request.version or None)
        return kserve_grpc.model_statistics_response(stats)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        entries = await self.dataplane.extensions.index(ready_only=request.ready)
        return kserve_grpc.repository_index_response(entries)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        parameters = kserve_grpc.repository_parameters(request.parameters)
        await self.dataplane.extensions.load(request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        parameters = kserve_grpc.repository_parameters(request.parameters)
        await self.dataplane.extensions.unload(request.model_name, parameters)
        return pb.RepositoryModelUnloadResponse()
