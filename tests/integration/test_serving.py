"""The deployed app over real HTTP: raw requests and the unmodified tritonclient."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from mpsserve.ops.demo import make_request, make_weights, reference
from tests.conftest import SEED, SMALL

DATATYPES = {"dense": "FP32"}


@pytest.fixture(scope="module")
def client(base_url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(base_url.removeprefix("http://"), network_timeout=60)


def triton_inputs(req: dict[str, np.ndarray], binary: bool) -> list[triton.InferInput]:
    inputs = []
    for name, array in req.items():
        item = triton.InferInput(name, list(array.shape), DATATYPES.get(name, "INT64"))
        item.set_data_from_numpy(array, binary_data=binary)
        inputs.append(item)
    return inputs


def test_health_and_metadata(client: triton.InferenceServerClient, base_url: str) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("rec")
    meta = client.get_model_metadata("rec")
    assert meta["versions"] == ["1"]
    assert [i["name"] for i in meta["inputs"]] == [
        "cat",
        "dense",
        "history_lengths",
        "history_values",
    ]
    assert requests.get(f"{base_url}/v2/models/nope", timeout=10).status_code == 404


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_2000_row_request_matches_reference(
    client: triton.InferenceServerClient, binary: bool
) -> None:
    req = make_request(SMALL, rows=2000, seed=21)
    outputs = [triton.InferRequestedOutput("score", binary_data=binary)]
    result = client.infer("rec", triton_inputs(req, binary), outputs=outputs)
    expected = reference(SMALL, make_weights(SMALL, SEED), req)
    scores = result.as_numpy("score")
    assert scores.shape == (2000,)
    assert np.abs(scores - expected).max() <= 1e-5
    assert result.get_response()["model_version"] == "1"


def _negative_id() -> dict[str, np.ndarray]:
    req = make_request(SMALL, rows=8, seed=1)
    req["history_values"][3] = -1
    return req


def _short_lengths() -> dict[str, np.ndarray]:
    req = make_request(SMALL, rows=8, seed=1)
    req["history_lengths"] = req["history_lengths"][:7]
    return req


@pytest.mark.parametrize(
    ("req", "status", "message"),
    [
        (_negative_id(), 400, "'history_values' has value -1"),
        (_short_lengths(), 400, "'history_lengths' has 7 rows"),
        ({**make_request(SMALL, rows=8), "extra": np.ones((8,), np.int64)}, 400, "'extra'"),
        (make_request(SMALL, rows=4001), 413, "at most 4000"),
    ],
    ids=["id-out-of-range", "lengths-rows", "unknown-input", "too-many-rows"],
)
def test_bad_request_gets_status_and_replica_keeps_serving(
    client: triton.InferenceServerClient, req: dict[str, np.ndarray], status: int, message: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("rec", triton_inputs(req, binary=True))
    assert info.value.status() == str(status) and message in info.value.message()
    good = client.infer("rec", triton_inputs(make_request(SMALL, rows=4, seed=2), binary=True))
    assert good.as_numpy("score").shape == (4,)


def test_wrong_dtype_is_named(base_url: str) -> None:
    body: dict[str, Any] = {
        "inputs": [{"name": "dense", "shape": [1, 13], "datatype": "FP64", "data": [0.0] * 13}]
    }
    response = requests.post(f"{base_url}/v2/models/rec/infer", json=body, timeout=30)
    assert response.status_code == 400
    assert "'dense' has dtype float64" in response.json()["error"]


def test_body_over_limit_is_413(base_url: str) -> None:
    response = requests.post(f"{base_url}/v2/models/rec/infer", data=b"x" * (17 << 20), timeout=30)
    assert response.status_code == 413 and "the limit is" in response.json()["error"]
