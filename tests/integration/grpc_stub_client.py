"""A plain grpcio client with mpsserve's generated stubs; prints one JSON line of results.

Run as a script (not imported by pytest): Triton's client, used in the test process,
registers the same ``inference`` protobuf symbols.
"""

from __future__ import annotations

import json
import sys

import grpc
import numpy as np

from mpsserve.ops.demo import make_request, make_weights, reference
from mpsserve.protocol import grpc_service_pb2 as pb
from mpsserve.protocol import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import SEED, SMALL

DATATYPES = {"dense": "FP32"}


def infer_request(req: dict[str, np.ndarray]) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="rec")
    for name, array in req.items():
        dtype = "FP64" if array.dtype == np.float64 else DATATYPES.get(name, "INT64")
        message.inputs.add(name=name, datatype=dtype, shape=list(array.shape))
        message.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return message


def main(address: str) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    req = make_request(SMALL, rows=2000, seed=51)
    reply = stub.ModelInfer(infer_request(req), timeout=60)
    scores = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)
    expected = reference(SMALL, make_weights(SMALL, SEED), req)
    bad = make_request(SMALL, rows=2)
    bad["dense"] = bad["dense"].astype(np.float64)
    try:
        stub.ModelInfer(infer_request(bad), timeout=60)
        wrong = ["OK", ""]
    except grpc.RpcError as exc:
        wrong = [exc.code().name, exc.details()]
    print(
        json.dumps(
            {
                "live": stub.ServerLive(pb.ServerLiveRequest()).live,
                "ready": stub.ServerReady(pb.ServerReadyRequest()).ready,
                "rows": int(scores.shape[0]),
                "max_abs_diff": float(np.abs(scores - expected).max()),
                "wrong_dtype": wrong,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
