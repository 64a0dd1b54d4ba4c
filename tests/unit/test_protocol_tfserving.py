"""The TensorFlow Serving REST predict codec, fed bodies built the way a TF-Serving client does.

A TF-Serving client sends plain ``json.dumps`` of ``{"instances": [...]}`` or ``{"inputs": ...}``
made from Python lists; these tests build exactly that from the demo workload and check the
decoded tensors against the originals.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from mpsserve.errors import InferenceError, InvalidInput
from mpsserve.ops.demo import DemoSpec, make_request, signature
from mpsserve.protocol.tfserving import decode_predict, encode_error, encode_predict, model_status
from mpsserve.types import InferResponse

SPEC = DemoSpec(table_rows=1000)
DTYPES = {spec.name: spec.dtype for spec in signature(SPEC).inputs}
ROWS = 5


@pytest.fixture
def original() -> dict[str, np.ndarray]:
    return make_request(SPEC, rows=ROWS)


def _instances(request: dict[str, np.ndarray], lengths: bool = True) -> list[dict[str, Any]]:
    """The request split into rows, each carrying its own slice of the history."""
    bounds = np.concatenate([[0], np.cumsum(request["history_lengths"])])
    rows = []
    for i in range(len(request["dense"])):
        row: dict[str, Any] = {
            "dense": request["dense"][i].tolist(),
            "cat": request["cat"][i].tolist(),
            "history_values": request["history_values"][bounds[i] : bounds[i + 1]].tolist(),
        }
        if lengths:
            row["history_lengths"] = int(request["history_lengths"][i])
        rows.append(row)
    return rows


def _body(doc: Any) -> bytes:
    return json.dumps(doc).encode("utf-8")


def _decode(doc: Any, dtypes: dict[str, str] = DTYPES) -> tuple[dict[str, np.ndarray], bool]:
    request, row_format = decode_predict(_body(doc), model="demo", version="2", dtypes=dtypes)
    assert (request.model, request.version, request.outputs, request.id) == (
        "demo",
        "2",
        None,
        None,
    )
    return request.inputs, row_format


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype, name
        assert np.array_equal(got[name], arr), name


# ---------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("lengths", [True, False], ids=["lengths-given", "lengths-computed"])
def test_row_format_with_ragged_history(original: dict[str, np.ndarray], lengths: bool) -> None:
    inputs, row_format = _decode({"instances": _instances(original, lengths)})
    assert row_format
    _assert_same(inputs, original)


def test_row_format_with_signature_name_and_empty_history(
    original: dict[str, np.ndarray],
) -> None:
    rows = _instances(original)
    rows[2]["history_values"], rows[2]["history_lengths"] = [], 0
    inputs, _ = _decode({"signature_name": "serving_default", "instances": rows})
    assert inputs["history_lengths"][2] == 0
    assert len(inputs["history_values"]) == sum(len(r["history_values"]) for r in rows)


def test_columnar_format(original: dict[str, np.ndarray]) -> None:
    inputs, row_format = _decode({"inputs": {k: v.tolist() for k, v in original.items()}})
    assert not row_format
    _assert_same(inputs, original)


def test_json_integers_for_float32_are_accepted(original: dict[str, np.ndarray]) -> None:
    rows = _instances(original)
    rows[0]["dense"] = list(range(13))
    inputs, _ = _decode({"instances": rows})
    assert inputs["dense"].dtype == np.float32
    assert np.array_equal(inputs["dense"][0], np.arange(13, dtype=np.float32))


def test_single_input_model_bare_values() -> None:
    dtypes = {"x": "float32"}
    inputs, row_format = _decode({"instances": [[1, 2.5], [3, 4]]}, dtypes)
    assert row_format
    assert np.array_equal(inputs["x"], np.array([[1, 2.5], [3, 4]], dtype=np.float32))
    inputs, row_format = _decode({"inputs": [[1, 2], [3, 4]]}, dtypes)
    assert not row_format
    assert inputs["x"].shape == (2, 2)
    inputs, _ = _decode({"instances": [{"x": 1.5}, {"x": 2}]}, dtypes)
    assert np.array_equal(inputs["x"], np.array([1.5, 2.0], dtype=np.float32))


# ------------------------------------------------------------------------------ bad input


def _rows_with(change: dict[str, Any], index: int = 1) -> dict[str, Any]:
    """The demo instances with one row's inputs replaced (a value of None deletes it)."""
    rows = _instances(make_request(SPEC, rows=3))
    for name, value in change.items():
        if value is None:
            del rows[index][name]
        else:
            rows[index][name] = value
    return {"instances": rows}


def _columns_with(change: dict[str, Any]) -> dict[str, Any]:
    columns = {k: v.tolist() for k, v in make_request(SPEC, rows=3).items()}
    return {"inputs": {**columns, **change}}


BAD: dict[str, tuple[Any, str]] = {
    "unknown-input-row": (_rows_with({"bogus": 1}, index=0), '"bogus"'),
    "unknown-input-column": (_columns_with({"bogus": [1]}), '"bogus"'),
    "missing-key-in-row": (_rows_with({"cat": None}), "cat"),
    "not-rectangular-row": (_rows_with({"dense": [1.0] * 12}), '"dense": instance 1'),
    "ragged-within-row": (_rows_with({"cat": [[1], [2, 3]]}), '"cat": instance 1'),
    "not-rectangular-column": (_columns_with({"dense": [[1.0], [2.0, 3.0]]}), "dense"),
    "string-for-float32": (_rows_with({"dense": ["a"] * 13}), "dense"),
    "null-for-float32": (_columns_with({"dense": [[None] * 13] * 3}), "dense"),
    "fraction-for-int64": (_rows_with({"cat": [1.5] * 26}), "cat"),
    "float-integral-for-int64": (_rows_with({"cat": [2.0] * 26}), "cat"),
    "bool-for-int64": (_columns_with({"history_lengths": [True, True, True]}), "history_lengths"),
    "int64-overflow": (_columns_with({"cat": [[2**63] * 26] * 3}), "cat"),
    "float32-overflow": (_columns_with({"dense": [[1e300] * 13] * 3}), "dense"),
    "fraction-in-ragged-values": (_rows_with({"history_values": [1, 2.5]}), "history_values"),
    "scalar-ragged-values": (_rows_with({"history_values": 7}), "history_values"),
    "nested-ragged-values": (_rows_with({"history_values": [[1], [2]]}), "history_values"),
    "lengths-disagree": (_rows_with({"history_lengths": 999}), '"history_lengths": instance 1'),
    "lengths-not-scalar": (_rows_with({"history_lengths": [1]}), "history_lengths"),
    "b64-value": (_rows_with({"dense": [{"b64": "AAAA"}] * 13}), "dense"),
    "b64-instance": ({"instances": [{"b64": "AAAA"}]}, "b64"),
    "bad-signature": ({"signature_name": "predict", "instances": [[1]]}, "signature_name"),
    "both-formats": ({"instances": [], "inputs": {}}, "exactly one"),
    "neither-format": ({"signature_name": "serving_default"}, "exactly one"),
    "empty-instances": ({"instances": []}, "instances"),
    "bare-instances-many-inputs": ({"instances": [[1.0] * 13]}, "4 inputs"),
    "bare-inputs-many-inputs": ({"inputs": [[1.0] * 13]}, "4 inputs"),
    "not-an-object": ([1, 2], "JSON object"),
}


@pytest.mark.parametrize(("doc", "expected"), BAD.values(), ids=BAD.keys())
def test_bad_requests_raise_invalid_input(doc: Any, expected: str) -> None:
    with pytest.raises(InvalidInput) as info:
        _decode(doc)
    assert expected in info.value.message


def test_invalid_json_names_the_position() -> None:
    with pytest.raises(InvalidInput, match="position 14"):
        decode_predict(b'{"instances": ]', model="m", version=None, dtypes=DTYPES)


def test_unknown_input_lists_the_models_inputs() -> None:
    with pytest.raises(InvalidInput, match="history_lengths") as info:
        _decode(_columns_with({"bogus": [1]}))
    assert "'dense'" in info.value.message


def test_mixed_bare_and_named_instances() -> None:
    with pytest.raises(InvalidInput, match='"x"'):
        _decode({"instances": [1, {"x": 2}]}, {"x": "float32"})


def test_b64_in_single_input_model() -> None:
    with pytest.raises(InvalidInput, match=r'"x".*b64'):
        _decode({"instances": [{"b64": "AAAA"}]}, {"x": "float32"})


# ---------------------------------------------------------------------------------- encode


def _encode(outputs: dict[str, np.ndarray], row_format: bool) -> Any:
    response = InferResponse(model="demo", version="1", outputs=outputs)
    return json.loads(encode_predict(response, row_format))


SCORE = np.array([0.25, 0.5, 0.75], dtype=np.float32)
PAIR = np.array([[1.5, -2.0], [0.0, 3.25], [4.0, 5.0]], dtype=np.float32)


def test_encode_one_output_row_format() -> None:
    assert _encode({"score": SCORE}, True) == {"predictions": [0.25, 0.5, 0.75]}
    assert _encode({"pair": PAIR}, True) == {"predictions": PAIR.tolist()}


def test_encode_one_output_columnar() -> None:
    assert _encode({"score": SCORE}, False) == {"outputs": [0.25, 0.5, 0.75]}
    assert _encode({"pair": PAIR}, False) == {"outputs": PAIR.tolist()}


def test_encode_two_outputs() -> None:
    rows = _encode({"score": SCORE, "pair": PAIR}, True)["predictions"]
    assert rows == [{"score": s, "pair": p} for s, p in zip(SCORE, PAIR.tolist(), strict=True)]
    columns = _encode({"score": SCORE, "pair": PAIR}, False)
    assert columns == {"outputs": {"score": SCORE.tolist(), "pair": PAIR.tolist()}}


def test_encoded_floats_are_plain_json_numbers() -> None:
    value = _encode({"score": np.array([0.1], dtype=np.float32)}, True)["predictions"][0]
    assert isinstance(value, float)
    assert np.float32(value) == np.float32(0.1)


def test_row_format_needs_a_shared_batch_dimension() -> None:
    with pytest.raises(InferenceError, match="batch"):
        _encode({"score": SCORE, "short": SCORE[:2]}, True)
    assert _encode({"score": SCORE, "short": SCORE[:2]}, False)["outputs"]["short"] == [0.25, 0.5]


def test_encode_error() -> None:
    assert json.loads(encode_error('unknown input "x"')) == {"error": 'unknown input "x"'}


def test_model_status() -> None:
    assert model_status(["1", "2"]) == {
        "model_version_status": [
            {
                "version": v,
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
            for v in ("1", "2")
        ]
    }
    failed = model_status(["3"], state="LOADING", error="warmup failed")
    assert failed["model_version_status"][0]["state"] == "LOADING"
    assert failed["model_version_status"][0]["status"] == {
        "error_code": "UNKNOWN",
        "error_message": "warmup failed",
    }
