"""The REST adapter and the data plane over an in-process Servable (no Ray)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient

from mpsserve.config import ModelConfig
from mpsserve.errors import ModelNotReady
from mpsserve.ingress.dataplane import DataPlane
from mpsserve.ingress.http import create_http_app
from mpsserve.model.servable import Servable
from mpsserve.ops.demo import make_request, make_weights, reference
from mpsserve.protocol.kserve import HEADER_LENGTH, encode_json_request
from mpsserve.types import InferRequest, InferResponse
from tests.conftest import SEED, SMALL


class LocalBackend:
    """A ModelBackend running a Servable in this process, off the event loop."""

    def __init__(self, servable: Servable) -> None:
        self.servable = servable

    async def infer(self, request: InferRequest) -> InferResponse:
        outputs = [o.name for o in request.outputs] if request.outputs else None
        version, tensors = await asyncio.to_thread(
            self.servable.infer, request.inputs, outputs, request.version
        )
        return InferResponse(request.model, version, tensors, request.id)

    async def metadata(self) -> dict[str, Any]:
        return self.servable.metadata()

    async def ready(self) -> bool:
        return self.servable.ready


@pytest.fixture(scope="module")
def servable(tf_store: Path) -> Servable:
    model = Servable(ModelConfig(name="rec", store=str(tf_store), max_rows=4000), device="cpu")
    model.load()
    return model


@pytest.fixture(scope="module")
def client(servable: Servable) -> TestClient:
    plane = DataPlane(
        {"rec": LocalBackend(servable)}, max_request_bytes=8 << 20, request_timeout_s=30
    )
    return TestClient(create_http_app(plane))


def binary_body(req: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    inputs = []
    for name, array in req.items():
        item = triton.InferInput(name, list(array.shape), "FP32" if name == "dense" else "INT64")
        item.set_data_from_numpy(array, binary_data=True)
        inputs.append(item)
    outputs = [triton.InferRequestedOutput("score", binary_data=True)]
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    return body, {HEADER_LENGTH: str(json_size)}


def test_health_and_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/rec/ready").status_code == 200
    meta = client.get("/v2/models/rec").json()
    assert meta["versions"] == ["1"] and meta["platform"] == "tensorflow_savedmodel"
    assert {"name": "dense", "datatype": "FP32", "shape": [-1, 13]} in meta["inputs"]
    assert client.get("/v2").json()["extensions"][0] == "binary_tensor_data"


def test_binary_infer_matches_reference(client: TestClient) -> None:
    req = make_request(SMALL, rows=2000, seed=5)
    body, headers = binary_body(req)
    response = client.post("/v2/models/rec/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    result = triton.InferenceServerClient.parse_response_body(
        response.content, header_length=int(response.headers[HEADER_LENGTH])
    )
    expected = reference(SMALL, make_weights(SMALL, SEED), req)
    assert np.abs(result.as_numpy("score") - expected).max() <= 1e-5
    assert result.get_response()["model_version"] == "1"


def test_json_infer_on_versioned_path(client: TestClient) -> None:
    req = make_request(SMALL, rows=20, seed=6)
    response = client.post("/v2/models/rec/versions/1/infer", content=encode_json_request(req))
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert out["name"] == "score" and out["shape"] == [20] and len(out["data"]) == 20


def _good() -> bytes:
    return encode_json_request(make_request(SMALL, rows=2, seed=1))


def _bad_lengths() -> bytes:
    req = make_request(SMALL, rows=10, seed=1)
    req["history_lengths"] = req["history_lengths"] + 1
    return encode_json_request(req)


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [
        ("/v2/models/nope/infer", b"{}", {}, 404, "unknown model 'nope'"),
        ("/v2/models/rec/versions/9/infer", _good(), {}, 404, "version 9 is not served"),
        ("/v2/models/rec/infer", b"{", {}, 400, "not valid JSON"),
        ("/v2/models/rec/infer", _bad_lengths(), {}, 400, "'history_lengths' adds up to"),
        ("/v2/models/rec/infer", b"{}", {HEADER_LENGTH: "x"}, 400, "not an integer"),
        ("/v2/models/rec/infer", b"0" * (9 << 20), {}, 413, "the limit is 8388608"),
    ],
)
def test_errors_map_to_status_and_message(
    client: TestClient, path: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    response = client.post(path, content=body, headers=headers)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_too_many_rows_is_413_and_next_request_succeeds(client: TestClient) -> None:
    body, headers = binary_body(make_request(SMALL, rows=4001, seed=2))
    response = client.post("/v2/models/rec/infer", content=body, headers=headers)
    assert response.status_code == 413 and "at most 4000" in response.json()["error"]
    body, headers = binary_body(make_request(SMALL, rows=3, seed=2))
    assert client.post("/v2/models/rec/infer", content=body, headers=headers).status_code == 200


def test_unknown_error_is_generic_500(servable: Servable, caplog: pytest.LogCaptureFixture) -> None:
    class Broken(LocalBackend):
        async def infer(self, request: InferRequest) -> InferResponse:
            raise KeyError("secret internals")

    plane = DataPlane({"rec": Broken(servable)}, max_request_bytes=1 << 20, request_timeout_s=5)
    response = TestClient(create_http_app(plane), raise_server_exceptions=False).post(
        "/v2/models/rec/infer", content=encode_json_request(make_request(SMALL, rows=2))
    )
    assert response.status_code == 500
    assert "secret" not in response.text and "internal error" in response.json()["error"]
    assert "secret internals" in caplog.text


def test_model_not_loaded_is_503(tf_store: Path) -> None:
    empty = Servable(ModelConfig(name="rec", store=str(tf_store)), device="cpu")
    plane = DataPlane({"rec": LocalBackend(empty)}, max_request_bytes=1 << 20, request_timeout_s=5)
    client = TestClient(create_http_app(plane))
    assert client.get("/v2/health/ready").status_code == 503
    response = client.post("/v2/models/rec/infer", content=json.dumps({"inputs": []}))
    assert response.status_code == 503 and "not loaded yet" in response.json()["error"]


def test_empty_store_is_not_ready(tmp_path: Path) -> None:
    with pytest.raises(ModelNotReady, match=r"no complete version in .* matches latest 1"):
        Servable(ModelConfig(name="rec", store=str(tmp_path)), device="cpu").load()


def test_pinned_version_is_served(tmp_path: Path, tf_store: Path) -> None:
    (tmp_path / "1").symlink_to(tf_store / "1")
    (tmp_path / "2").symlink_to(tf_store / "1")
    config = ModelConfig.model_validate(
        {"name": "rec", "store": str(tmp_path), "version_policy": {"specific": [1]}}
    )
    model = Servable(config, device="cpu")
    model.load()
    assert model.version == 1
