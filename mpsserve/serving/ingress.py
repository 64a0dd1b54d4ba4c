"""The ingress deployment: a ``DataPlane`` over Ray Serve handles, served by the HTTP adapter."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from mpsserve.config import IngressConfig
from mpsserve.dataplane import DataPlane
from mpsserve.serving.grpc import GrpcAdapter
from mpsserve.serving.http import create_http_app
from mpsserve.settings import settings
from mpsserve.types import InferRequest, InferResponse


class RayModelBackend:
    """A ``ModelBackend`` that forwards to a model deployment's replicas."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def infer(self, request: InferRequest) -> InferResponse:
        outputs = [o.name for o in request.outputs] if request.outputs else None
        result = await self._handle.infer.remote(request.inputs, outputs, request.version)
        if isinstance(result, Exception):
            raise result
        version, tensors = result
        return InferResponse(request.model, version, tensors, request.id)

    async def metadata(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._handle.metadata.remote()
        return result

    async def ready(self) -> bool:
        try:
            call = self._handle.ready.remote()
            return bool(await asyncio.wait_for(call, settings().probe_timeout_s))
        except Exception:  # no replica up, or it is failing: not ready, and say no more
            return False


@serve.deployment(name="ingress")
@serve.ingress()
class Ingress:
    def __init__(self, handles: dict[str, DeploymentHandle], ingress: dict[str, Any]) -> None:
        config = IngressConfig.model_validate(ingress)
        backends = {name: RayModelBackend(h) for name, h in handles.items()}
        self.dataplane = DataPlane(
            backends,
            max_request_bytes=int(config.max_request_mb * 2**20),
            request_timeout_s=config.request_timeout_s,
        )

        self._grpc = GrpcAdapter(self.dataplane)

    def __serve_build_asgi_app__(self) -> Any:
        return create_http_app(self.dataplane)

    # KServe v2 gRPC: Serve's gRPC proxy calls the method named after the RPC.
    async def ServerLive(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc.call("ServerLive", request, grpc_context)

    async def ServerReady(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc.call("ServerReady", request, grpc_context)

    async def ServerMetadata(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc.call("ServerMetadata", request, grpc_context)

    async def ModelReady(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc.call("ModelReady", request, grpc_context)

    async def ModelMetadata(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc.call("ModelMetadata", request, grpc_context)

    async def ModelInfer(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc.call("ModelInfer", request, grpc_context)
