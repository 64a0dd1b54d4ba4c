"""The echo model the ingress tests serve: ``MockBackend`` (the ingress's test double) doubling
its FP32 input ``x`` into ``y``, optionally held at a gate."""

from __future__ import annotations

import asyncio
from typing import Any

from mpsserve.ingress.backends import MockBackend
from mpsserve.types import InferRequest, InferResponse

SPEC = [{"name": "x", "dtype": "float32", "shape": [-1]}]
METADATA: dict[str, Any] = {"versions": ["1"], "inputs": SPEC, "outputs": SPEC}


class Gate:
    """While ``event`` is an Event not yet set, every echo request waits for it."""

    event: asyncio.Event | None = None


def echo_backend(gate: Gate | None = None) -> MockBackend:
    async def echo(request: InferRequest) -> InferResponse:
        if gate is not None and gate.event is not None:
            await gate.event.wait()
        return InferResponse(request.model, "1", {"y": request.inputs["x"] * 2}, request.id)

    return MockBackend(echo, METADATA)
