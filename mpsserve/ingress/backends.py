"""What runs a model, as the data plane sees it: one interface, the real transport, a double.

``ModelBackend`` is the interface between the transport-free ``DataPlane`` and the wire (as
httpx's ``BaseTransport`` is between its client and the network): infer, metadata, ready.
``ReplicaBackend`` is production's: frames to the model's replicas through the ingress's
``router.Router`` (least busy replica, retries, deadlines). ``MockBackend`` is the test double
(httpx's ``MockTransport``): a function of the request, in this process, so the data plane and
both adapters are tested with no replica, no Ray and no socket behind them.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from mpsserve.errors import PayloadTooLarge
from mpsserve.ingress.router import Router
from mpsserve.protocol import frame
from mpsserve.types import InferRequest, InferResponse


class ModelBackend(Protocol):
    async def infer(self, request: InferRequest) -> InferResponse: ...

    async def metadata(self) -> dict[str, Any]: ...

    async def ready(self) -> bool: ...


class ReplicaBackend:
    """A ``ModelBackend`` that sends frames to a model's replicas through the router."""

    def __init__(self, model: str, router: Router) -> None:
        self.model, self._router = model, router

    async def _call(
        self, header: dict[str, Any], tensors: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], bytes]:
        parts = frame.encode(header, tensors)
        limit = self._router.limits.max_request_bytes
        if frame.body_size(parts) > limit:  # a JSON body can decode to more tensor bytes
            raise PayloadTooLarge(
                f"the request's tensors take {frame.body_size(parts)} bytes; the limit is "
                f"{limit} (ingress.max_request_mb)"
            )
        answer, body = await self._router.call(self.model, parts)
        frame.raise_for_error(answer)
        return answer, body

    async def infer(self, request: InferRequest) -> InferResponse:
        header = {
            "op": "infer",
            "model": self.model,
            "version": request.version,
            "outputs": [o.name for o in request.outputs] if request.outputs else None,
        }
        answer, body = await self._call(header, request.inputs)
        outputs = frame.tensors(answer, body)
        return InferResponse(request.model, answer["version"], outputs, request.id)

    async def metadata(self) -> dict[str, Any]:
        answer, _ = await self._call({"op": "metadata"})
        metadata: dict[str, Any] = answer["metadata"]
        return metadata

    async def ready(self) -> bool:
        return self._router.has_replica(self.model)


Handler = Callable[[InferRequest], InferResponse | Awaitable[InferResponse]]


class MockBackend:
    """A ``ModelBackend`` answering with ``handler(request)`` (a plain function runs in a
    worker thread, as a model would; a coroutine function on the loop), ``metadata`` as given.
    ``ready`` is a plain attribute a test may flip; ``calls`` counts inference calls."""

    def __init__(self, handler: Handler, metadata: dict[str, Any], ready: bool = True) -> None:
        self.handler, self._metadata, self.is_ready, self.calls = handler, metadata, ready, 0

    async def infer(self, request: InferRequest) -> InferResponse:
        self.calls += 1
        if inspect.iscoroutinefunction(self.handler):
            return await self.handler(request)
        answer = await asyncio.to_thread(self.handler, request)
        assert isinstance(answer, InferResponse), "the handler must return an InferResponse"
        return answer

    async def metadata(self) -> dict[str, Any]:
        return self._metadata

    async def ready(self) -> bool:
        return self.is_ready
