"""TF Serving's services on the ingress's real gRPC server (``start_grpc_server``) over a
``MockBackend``, called with ``tensorflow-serving-api``'s stubs: the bounds and refusals every
gRPC request meets (size, in-flight bound, unknown model) and the request id; no Ray."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from mpsserve.ingress.backends import MockBackend
from mpsserve.ingress.dataplane import DataPlane
from mpsserve.ingress.grpc import GrpcLimits
from mpsserve.types import InferRequest, InferResponse
from tests.grpc_server import grpc_server_thread

tf = pytest.importorskip("tensorflow")
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

METADATA = {
    "name": "echo",
    "versions": ["4"],
    "platform": "mock",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}],
}
BLOCK = threading.Event()


def double(request: InferRequest) -> InferResponse:
    BLOCK.wait(10)
    return InferResponse("echo", "4", {"y": request.inputs["x"] * 2})


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[prediction_service_pb2_grpc.PredictionServiceStub, DataPlane]]:
    BLOCK.set()
    plane = DataPlane({"echo": MockBackend(double, METADATA)}, 4096, 10, max_in_flight=1)
    limits = GrpcLimits(1 << 20, 8192, 1.0, 16, 10, 8, 5.0, None, 60.0, 10.0)
    with grpc_server_thread(plane, limits) as port:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield prediction_service_pb2_grpc.PredictionServiceStub(channel), plane
        finally:
            channel.close()


def request(values: np.ndarray, model: str = "echo") -> Any:
    message = predict_pb2.PredictRequest()
    message.model_spec.name = model
    message.inputs["x"].CopyFrom(tf.make_tensor_proto(values))
    return message


def error(stub: Any, message: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(message, timeout=10)
    return info.value.code(), info.value.details()


def test_predict_and_its_request_id(served: Any) -> None:
    stub, _ = served
    reply, call = stub.Predict.with_call(
        request(np.array([1, 2], np.float32)), timeout=10, metadata=(("x-request-id", "abc-1"),)
    )
    assert list(reply.outputs["y"].float_val) == [2.0, 4.0]
    assert reply.model_spec.version.value == 4
    assert ("x-request-id", "abc-1") in [(m.key, m.value) for m in call.trailing_metadata()]


def test_refusals(served: Any) -> None:
    stub, _ = served
    code, details = error(stub, request(np.zeros(2000, np.float32)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 4096" in details
    code, details = error(stub, request(np.zeros(2, np.float32), model="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown model 'nope'" in details


def test_past_the_in_flight_bound_is_unavailable(served: Any) -> None:
    stub, plane = served
    BLOCK.clear()
    try:
        first = stub.Predict.future(request(np.ones(1, np.float32)), timeout=20)
        deadline = time.monotonic() + 10
        while plane.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        code, details = error(stub, request(np.ones(1, np.float32)))
        assert code == grpc.StatusCode.UNAVAILABLE and "max_in_flight_requests" in details
    finally:
        BLOCK.set()
    assert list(first.result().outputs["y"].float_val) == [2.0]
