"""TF-Serving REST: what a TF-Serving client sends (plain JSON), answered unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import requests

from mpsserve.ops.demo import make_request, make_weights, reference
from tests.conftest import SEED, SMALL


def rows_of(req: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    ends = np.cumsum(req["history_lengths"])
    starts = ends - req["history_lengths"]
    return [
        {
            "dense": req["dense"][i].tolist(),
            "cat": req["cat"][i].tolist(),
            "history_values": req["history_values"][starts[i] : ends[i]].tolist(),
        }
        for i in range(req["dense"].shape[0])
    ]


def test_row_format_predict_matches_reference(base_url: str) -> None:
    req = make_request(SMALL, rows=500, seed=61)
    response = requests.post(
        f"{base_url}/v1/models/rec:predict", json={"instances": rows_of(req)}, timeout=60
    )
    assert response.status_code == 200, response.text
    scores = np.asarray(response.json()["predictions"], dtype=np.float32)
    assert np.abs(scores - reference(SMALL, make_weights(SMALL, SEED), req)).max() <= 1e-5


def test_columnar_predict(base_url: str) -> None:
    req = make_request(SMALL, rows=20, seed=62)
    body = {"inputs": {k: v.tolist() for k, v in req.items()}}
    response = requests.post(f"{base_url}/v1/models/rec/versions/1:predict", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["outputs"]) == 20


def test_model_status_and_errors(base_url: str) -> None:
    status = requests.get(f"{base_url}/v1/models/rec", timeout=10).json()
    assert status["model_version_status"][0]["version"] == "1"
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    assert requests.get(f"{base_url}/v1/models/nope", timeout=10).status_code == 404
    bad = requests.post(
        f"{base_url}/v1/models/rec:predict", json={"instances": [{"age": 1}]}, timeout=10
    )
    assert bad.status_code == 400 and "age" in bad.json()["error"]
