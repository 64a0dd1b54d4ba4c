"""KServe v2 gRPC through Ray Serve's gRPC proxy: the unmodified tritonclient.grpc, and plain
grpcio with our generated stubs (in a subprocess: both register the ``inference`` protos)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mpsserve.ops.demo import make_request, make_weights, reference
from tests.conftest import SEED, SMALL

DATATYPES = {"dense": "FP32"}


@pytest.fixture(scope="module")
def client(grpc_address: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(grpc_address)


def triton_inputs(req: dict[str, np.ndarray]) -> list[triton.InferInput]:
    inputs = []
    for name, array in req.items():
        item = triton.InferInput(name, list(array.shape), DATATYPES.get(name, "INT64"))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("rec")
    meta = client.get_model_metadata("rec", as_json=True)
    assert meta["versions"] == ["1"]
    assert {"name": "dense", "datatype": "FP32", "shape": ["-1", "13"]} in meta["inputs"]
    assert "binary_tensor_data" in client.get_server_metadata(as_json=True)["extensions"]


def test_2000_row_infer_matches_reference(client: triton.InferenceServerClient) -> None:
    req = make_request(SMALL, rows=2000, seed=41)
    result = client.infer("rec", triton_inputs(req))
    scores = result.as_numpy("score")
    assert scores.shape == (2000,)
    assert np.abs(scores - reference(SMALL, make_weights(SMALL, SEED), req)).max() <= 1e-5
    assert result.get_response(as_json=True)["model_version"] == "1"


def _bad_lengths() -> dict[str, np.ndarray]:
    req = make_request(SMALL, rows=8, seed=1)
    req["history_lengths"] = req["history_lengths"] * 2
    return req


@pytest.mark.parametrize(
    ("model", "req", "code", "message"),
    [
        ("nope", make_request(SMALL, rows=2), "NOT_FOUND", "unknown model 'nope'"),
        ("rec", _bad_lengths(), "INVALID_ARGUMENT", "'history_lengths' adds up to"),
        (
            "rec",
            {**make_request(SMALL, rows=2), "x": np.ones(2, np.int64)},
            "INVALID_ARGUMENT",
            "unknown input 'x'",
        ),
        ("rec", make_request(SMALL, rows=4001), "RESOURCE_EXHAUSTED", "at most 4000"),
    ],
    ids=["unknown-model", "lengths", "unknown-input", "too-many-rows"],
)
def test_errors_get_grpc_codes_and_the_rest_message(
    client: triton.InferenceServerClient,
    model: str,
    req: dict[str, np.ndarray],
    code: str,
    message: str,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, triton_inputs(req))
    assert info.value.status() == f"StatusCode.{code}" and message in info.value.message()
    good = client.infer("rec", triton_inputs(make_request(SMALL, rows=3, seed=9)))
    assert good.as_numpy("score").shape == (3,)


def test_plain_grpcio_with_our_stubs(grpc_address: str) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.grpc_stub_client", grpc_address],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["live"] and report["ready"]
    assert report["rows"] == 2000 and report["max_abs_diff"] <= 1e-5
    assert report["wrong_dtype"] == [
        grpc.StatusCode.INVALID_ARGUMENT.name,
        "input 'dense' has dtype float64; the model expects float32",
    ]
