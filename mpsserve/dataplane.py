"""The transport-free core of the ingress (KServe's ``DataPlane``).

REST today and gRPC next call these methods and only translate wire formats; neither holds
logic. A ``ModelBackend`` is whatever runs a model: Ray Serve handles in production, an
in-process ``Servable`` in unit tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Protocol

from mpsserve import __version__
from mpsserve.errors import DeadlineExceeded, ModelNotFound, PayloadTooLarge
from mpsserve.types import InferRequest, InferResponse

EXTENSIONS = ["binary_tensor_data"]
DTYPES_TTL_S = 10.0  # how long an input-dtype map read from a replica is reused


class ModelBackend(Protocol):
    async def infer(self, request: InferRequest) -> InferResponse: ...

    async def metadata(self) -> dict[str, Any]: ...

    async def ready(self) -> bool: ...


class DataPlane:
    def __init__(
        self,
        backends: Mapping[str, ModelBackend],
        max_request_bytes: int,
        request_timeout_s: float,
    ) -> None:
        self._backends = backends
        self.max_request_bytes = max_request_bytes
        self._timeout_s = request_timeout_s
        self._dtypes: dict[str, tuple[float, dict[str, str]]] = {}

    @staticmethod
    def live() -> bool:
        return True

    async def ready(self) -> bool:
        """Ready when every model is: a load balancer should not send traffic before."""
        states = await asyncio.gather(*(b.ready() for b in self._backends.values()))
        return all(states)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "mpsserve", "version": __version__, "extensions": EXTENSIONS}

    def models(self) -> list[str]:
        return sorted(self._backends)

    def backend(self, name: str) -> ModelBackend:
        try:
            return self._backends[name]
        except KeyError:
            raise ModelNotFound(
                f"unknown model {name!r}; this server serves {self.models()}"
            ) from None

    async def model_ready(self, name: str, version: str | None = None) -> bool:
        backend = self.backend(name)
        if version is None:
            return await backend.ready()
        return await backend.ready() and version in (await backend.metadata())["versions"]

    async def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        metadata = await self.backend(name).metadata()
        if version is not None and version not in metadata["versions"]:
            raise ModelNotFound(
                f"model {name!r} version {version} is not served; serving {metadata['versions']}"
            )
        return metadata

    async def input_dtypes(self, name: str) -> dict[str, str]:
        """Input name -> numpy dtype, for wire formats that carry untyped JSON (TF Serving)."""
        cached = self._dtypes.get(name)
        if cached is not None and time.monotonic() - cached[0] < DTYPES_TTL_S:
            return cached[1]
        metadata = await self.model_metadata(name)
        dtypes = {spec["name"]: spec["dtype"] for spec in metadata["inputs"]}
        self._dtypes[name] = (time.monotonic(), dtypes)
        return dtypes

    def check_size(self, size: int) -> None:
        """Refuse a body over the limit before decoding it."""
        if size > self.max_request_bytes:
            raise PayloadTooLarge(
                f"request body is {size} bytes; the limit is {self.max_request_bytes} "
                "(ingress.max_request_mb)"
            )

    async def infer(self, request: InferRequest) -> InferResponse:
        backend = self.backend(request.model)
        try:
            return await asyncio.wait_for(backend.infer(request), self._timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"model {request.model!r} did not answer within {self._timeout_s:g}s"
            ) from None
