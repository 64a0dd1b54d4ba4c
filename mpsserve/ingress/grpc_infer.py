"""The inference RPC's flow, shared by every gRPC protocol the ingress serves (KServe v2's
``ModelInfer``, TF Serving's ``Predict``): admission, size and model checks, decoding, the
refusal counted, the request id, the data plane's ``infer``. Each servicer passes only what
differs: how to size, name and decode its message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from mpsserve.errors import MpsServeError
from mpsserve.ingress.dataplane import DataPlane, client_request_id, request_id_for
from mpsserve.types import InferRequest, InferResponse

#: The metadata key of a request's id (in: the client's; out: a trailing entry).
REQUEST_ID = "x-request-id"


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """The value of invocation metadata ``key``, if the client sent it."""
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return str(item.value)
    return None


async def infer_rpc(
    dataplane: DataPlane,
    context: grpc.aio.ServicerContext,
    protocol: str,
    model: str,
    size: Callable[[], int],
    resolve: Callable[[], str],
    decode: Callable[[], InferRequest],
) -> tuple[InferRequest, InferResponse]:
    """One inference RPC of any gRPC protocol through the data plane: admitted (or shed)
    under ``model``, then its ``size`` checked, the model ``resolve`` names looked up (an
    unknown one answers NOT_FOUND before the tensors are read) and the message decoded; a
    refusal is counted as the protocol's and the request id goes back as trailing metadata."""
    started = time.perf_counter()
    request_id = client_request_id(metadata_value(context, REQUEST_ID))
    with dataplane.admission(model, protocol, request_id):
        try:
            dataplane.check_size(size())
            dataplane.backend(resolve())
            decoded = decode()
        except MpsServeError as exc:
            dataplane.rejected(model, protocol, request_id, exc, started)
            raise
        request_id = request_id_for(request_id, decoded.id)
        context.set_trailing_metadata(((REQUEST_ID, request_id),))  # no frame of its own
        return decoded, await dataplane.infer(decoded, protocol, request_id)
