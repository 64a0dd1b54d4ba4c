"""Conformance of the KServe v2 REST codec with the real Triton HTTP client.

Request bodies are built and response bodies parsed by ``tritonclient.http`` itself, so these
tests check compatibility with the client users run, not our reading of the spec.
"""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from mpsserve.errors import InferenceError, InvalidInput
from mpsserve.protocol.kserve import (
    HEADER_LENGTH,
    decode_infer_request,
    encode_error,
    encode_infer_response,
)
from mpsserve.protocol.tensors import DATATYPE_TO_NUMPY, numpy_to_datatype
from mpsserve.types import InferRequest, InferResponse, RequestedOutput

Client = httpclient.InferenceServerClient


def _input(name: str, arr: np.ndarray, binary: bool) -> httpclient.InferInput:
    inp = httpclient.InferInput(name, list(arr.shape), numpy_to_datatype(arr.dtype))
    inp.set_data_from_numpy(arr, binary_data=binary)
    return inp


def _client_body(
    tensors: dict[str, tuple[np.ndarray, bool]], **kwargs: Any
) -> tuple[bytes, int | None]:
    """Request body and header length exactly as tritonclient sends them."""
    inputs = [_input(name, arr, binary) for name, (arr, binary) in tensors.items()]
    body_and_length: tuple[bytes, int | None] = Client.generate_request_body(inputs, **kwargs)
    return body_and_length


def _decode(body: bytes, header_length: int | None = None) -> InferRequest:
    return decode_infer_request(body, model="m", header_length=header_length)


def _roundtrip_response(
    outputs: dict[str, np.ndarray], request: InferRequest, response_id: str | None = None
) -> tuple[Any, dict[str, str]]:
    """Encode a response and parse it back with tritonclient."""
    response = InferResponse(model="m", version="3", outputs=outputs, id=response_id)
    body, headers = encode_infer_response(response, request)
    length = headers.get(HEADER_LENGTH)
    result = Client.parse_response_body(
        body, verbose=False, header_length=None if length is None else int(length)
    )
    return result, headers


SAMPLES: dict[str, np.ndarray] = {
    "FP32": np.array([[1.5, -2.25, 3.0], [4.0, 5.5, -0.0]], dtype=np.float32),
    "INT64": np.array([[1, -(2**62)], [2**62, 0]], dtype=np.int64),
    "INT32": np.array([7, -8, 2**31 - 1], dtype=np.int32),
    "BOOL": np.array([[True, False], [False, True]]),
    "FP16": np.array([0.5, -1.0, 65504.0], dtype=np.float16),
    "BYTES": np.array([[b"ab", b""], [b"caf\xc3\xa9", b"x y"]], dtype=object),
}


# ------------------------------------------------------------------------------ datatypes


def test_datatype_table_round_trips() -> None:
    for name, dtype in DATATYPE_TO_NUMPY.items():
        assert numpy_to_datatype(dtype) == name
    assert numpy_to_datatype(np.dtype(">f4")) == "FP32"
    assert numpy_to_datatype(np.dtype("S3")) == "BYTES"


def test_numpy_to_datatype_rejects_unsupported() -> None:
    with pytest.raises(ValueError, match="complex"):
        numpy_to_datatype(np.complex64)


# ------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_decode_client_input(datatype: str, binary: bool) -> None:
    arr = SAMPLES[datatype]
    body, length = _client_body({"x": (arr, binary)}, request_id="r1")
    assert (length is not None) == binary
    request = _decode(body, length)
    got = request.inputs["x"]
    assert request.model == "m" and request.id == "r1"
    assert got.shape == arr.shape
    assert got.dtype == DATATYPE_TO_NUMPY[datatype]
    assert np.array_equal(got, arr)
    if datatype == "BYTES":
        assert all(type(e) is bytes for e in got.ravel())


def test_decode_mixed_binary_and_json_inputs() -> None:
    tensors = {
        "a": (SAMPLES["FP32"], True),
        "b": (SAMPLES["INT32"], False),
        "c": (SAMPLES["BYTES"], True),
        "d": (SAMPLES["BOOL"], False),
        "e": (SAMPLES["INT64"], True),
    }
    body, length = _client_body(tensors)
    request = _decode(body, length)
    assert list(request.inputs) == list(tensors)
    for name, (arr, _) in tensors.items():
        assert np.array_equal(request.inputs[name], arr), name


def test_decode_nested_and_flat_json_data() -> None:
    doc = {
        "inputs": [
            {"name": "flat", "shape": [2, 2], "datatype": "FP32", "data": [1, 2.5, 3, 4]},
            {"name": "nest", "shape": [2, 2], "datatype": "INT8", "data": [[1, -2], [3, 4]]},
            {"name": "s", "shape": [1, 2], "datatype": "BYTES", "data": [["a", "é"]]},
            {"name": "empty", "shape": [0, 3], "datatype": "INT64", "data": []},
        ]
    }
    inputs = _decode(json.dumps(doc).encode()).inputs
    assert np.array_equal(inputs["flat"], np.array([[1, 2.5], [3, 4]], dtype=np.float32))
    assert inputs["flat"].dtype == np.float32
    assert np.array_equal(inputs["nest"], np.array([[1, -2], [3, 4]], dtype=np.int8))
    assert inputs["s"].tolist() == [[b"a", "é".encode()]]
    assert inputs["empty"].shape == (0, 3) and inputs["empty"].dtype == np.int64


def test_decode_large_batch_exactly() -> None:
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((2000, 13)).astype(np.float32)
    sparse = rng.integers(-(2**40), 2**40, size=(2000, 26), dtype=np.int64)
    body, length = _client_body({"dense": (dense, True), "sparse": (sparse, True)})
    request = _decode(body, length)
    assert np.array_equal(request.inputs["dense"], dense)
    assert np.array_equal(request.inputs["sparse"], sparse)


def test_binary_fp32_input_is_not_copied() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    body, length = _client_body({"x": (arr, True)})
    got = _decode(body, length).inputs["x"]
    assert np.shares_memory(got, np.frombuffer(body, dtype=np.uint8))
    assert np.array_equal(got, arr)


def test_decode_requested_outputs_and_parameters() -> None:
    outputs = [
        httpclient.InferRequestedOutput("p", binary_data=True),
        httpclient.InferRequestedOutput("q", binary_data=False),
    ]
    body, length = _client_body(
        {"x": (SAMPLES["FP32"], False)}, outputs=outputs, parameters={"k": "v"}
    )
    request = decode_infer_request(body, model="m", version="2", header_length=length)
    assert request.outputs == [RequestedOutput("p", True), RequestedOutput("q", False)]
    assert request.version == "2" and request.id is None
    assert request.parameters == {"k": "v"}
    assert request.wants_binary("p") and not request.wants_binary("q")
    assert not request.binary_output and not request.wants_binary("other")


def test_decode_without_outputs_sets_binary_output() -> None:
    # tritonclient asks for binary_data_output when no outputs are listed.
    body, length = _client_body({"x": (SAMPLES["FP32"], False)})
    request = _decode(body, length)
    assert request.outputs is None
    assert request.binary_output and request.wants_binary("anything")


# ------------------------------------------------------------------------------ bad input


def _doc(*inputs: Any, **top: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **top}).encode()


def _fp32(name: str | None = "dense", **fields: Any) -> dict[str, Any]:
    entry = {"name": name, "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}
    entry.update(fields)
    return {k: v for k, v in entry.items() if v is not None}


def _binary_body(entries: list[dict[str, Any]], tail: bytes) -> tuple[bytes, int]:
    header = json.dumps({"inputs": entries}).encode()
    return header + tail, len(header)


def _bin(name: str, size: Any, shape: list[int], datatype: str = "FP32") -> dict[str, Any]:
    return {
        "name": name,
        "shape": shape,
        "datatype": datatype,
        "parameters": {"binary_data_size": size},
    }


_EIGHT = np.array([1, 2], dtype=np.float32).tobytes()

BAD_REQUESTS: list[tuple[str, bytes, int | None, list[str]]] = [
    ("not json", b'{"inputs": [', None, ["not valid JSON", "position 12"]),
    ("not utf8", b'{"inputs": "\xff\xfe"}', None, ["UTF-8"]),
    ("not object", b"[1, 2]", None, ["JSON object"]),
    ("header too long", _doc(_fp32()), 10_000, [HEADER_LENGTH, "larger than the body"]),
    ("header negative", _doc(_fp32()), -1, [HEADER_LENGTH, "negative"]),
    ("header cuts json", _doc(_fp32()), 5, ["not valid JSON"]),
    ("inputs missing", b"{}", None, ['"inputs"', "missing"]),
    ("inputs not list", b'{"inputs": {"a": 1}}', None, ['"inputs"', "not a list"]),
    ("input not object", _doc("dense"), None, ["inputs[0]", "JSON object"]),
    ("input without name", _doc(_fp32(name=None)), None, ["inputs[0]", '"name"']),
    ("input empty name", _doc(_fp32(), _fp32(name="")), None, ["inputs[1]", '"name"']),
    ("duplicate input", _doc(_fp32(), _fp32()), None, ["duplicate", "dense"]),
    ("unknown datatype", _doc(_fp32(datatype="FP99")), None, ["FP99", "dense"]),
    ("no datatype", _doc(_fp32(datatype=None)), None, ["datatype", "dense"]),
    ("shape missing", _doc(_fp32(shape=None)), None, ["dense", "shape"]),
    ("shape not list", _doc(_fp32(shape=2)), None, ["dense", "shape"]),
    ("shape negative", _doc(_fp32(shape=[-2])), None, ["dense", "shape"]),
    ("shape float", _doc(_fp32(shape=[2.0])), None, ["dense", "shape"]),
    ("shape bool", _doc(_fp32(shape=[True, 2])), None, ["dense", "shape"]),
    ("shape huge empty", _doc(_fp32(shape=[0, 2**70], data=[])), None, ["dense", "too large"]),
    ("shape many dims", _doc(_fp32(shape=[1] * 65, data=[])), None, ["dense", "too large"]),
    ("count too few", _doc(_fp32(shape=[3])), None, ["dense", "needs 3", "has 2"]),
    ("count too many", _doc(_fp32(shape=[1])), None, ["dense", "needs 1", "has 2"]),
    ("nested count", _doc(_fp32(data=[[1, 2], [3, 4]])), None, ["dense", "needs 2", "has 4"]),
    ("ragged", _doc(_fp32(data=[[1, 2], [3]])), None, ["dense", "ragged"]),
    ("strings for fp32", _doc(_fp32(data=["1", "2"])), None, ["dense", "FP32"]),
    ("null in data", _doc(_fp32(data=[1, None])), None, ["dense", "FP32"]),
    ("object in data", _doc(_fp32(data=[1, {}])), None, ["dense", "FP32"]),
    ("data not list", _doc(_fp32(data=3.0, shape=[1])), None, ["dense", '"data"']),
    ("float for int", _doc(_fp32(datatype="INT32", data=[1.5, 2])), None, ["dense", "INT32"]),
    ("int for bool", _doc(_fp32(datatype="BOOL", data=[1, 0])), None, ["dense", "BOOL"]),
    ("bool for int", _doc(_fp32(datatype="INT8", data=[True, False])), None, ["dense", "INT8"]),
    ("uint8 overflow", _doc(_fp32(datatype="UINT8", data=[1, 256])), None, ["dense", "range"]),
    ("uint negative", _doc(_fp32(datatype="UINT32", data=[-1, 2])), None, ["dense", "range"]),
    ("int64 overflow", _doc(_fp32(datatype="INT64", data=[2**64, 1])), None, ["dense", "INT64"]),
    ("bytes not str", _doc(_fp32(datatype="BYTES", data=[1, "a"])), None, ["dense", "strings"]),
    ("neither", _doc(_fp32(data=None)), None, ["dense", "neither"]),
    ("both", _doc(_fp32(parameters={"binary_data_size": 8})), None, ["dense", "both"]),
    ("params not object", _doc(_fp32(parameters=[1])), None, ["dense", "parameters"]),
    ("size negative", *_binary_body([_bin("dense", -8, [2])], _EIGHT), ["dense", "non-negative"]),
    ("size string", *_binary_body([_bin("dense", "8", [2])], _EIGHT), ["dense", "non-negative"]),
    ("size vs shape", *_binary_body([_bin("dense", 8, [3])], _EIGHT), ["dense", "needs 12"]),
    ("sizes exceed", *_binary_body([_bin("dense", 12, [3])], _EIGHT), ["dense", "only 8"]),
    (
        "sizes short",
        *_binary_body([_bin("dense", 8, [2])], _EIGHT + b"junk"),
        ["12 bytes follow", "add up to 8"],
    ),
    ("binary without header", _doc(_bin("dense", 8, [2])), None, ["dense", HEADER_LENGTH]),
    (
        "second input exceeds",
        *_binary_body([_bin("a", 8, [2]), _bin("sparse", 8, [1], "INT64")], _EIGHT),
        ["sparse", "only 8"],
    ),
    (
        "bytes truncated prefix",
        *_binary_body([_bin("tok", 6, [2], "BYTES")], struct.pack("<I", 1) + b"a" + b"\0"),
        ["tok", "length prefix"],
    ),
    (
        "bytes overrun",
        *_binary_body([_bin("tok", 5, [1], "BYTES")], struct.pack("<I", 9) + b"a"),
        ["tok", "overruns"],
    ),
    (
        "bytes count",
        *_binary_body([_bin("tok", 5, [2], "BYTES")], struct.pack("<I", 1) + b"a"),
        ["tok", "needs 2", "has 1"],
    ),
    ("shared memory", _doc(_fp32(parameters={"shared_memory_region": "r"})), None, ["dense"]),
    ("outputs not list", _doc(_fp32(), outputs={"name": "y"}), None, ['"outputs"']),
    ("output without name", _doc(_fp32(), outputs=[{"x": 1}]), None, ["outputs[0]", '"name"']),
    ("output not object", _doc(_fp32(), outputs=["y"]), None, ["outputs[0]"]),
    ("duplicate output", _doc(_fp32(), outputs=[{"name": "y"}] * 2), None, ["duplicate", "y"]),
    (
        "output binary_data not bool",
        _doc(_fp32(), outputs=[{"name": "y", "parameters": {"binary_data": "yes"}}]),
        None,
        ["y", "binary_data"],
    ),
    ("request params", _doc(_fp32(), parameters=[]), None, ['"parameters"']),
    (
        "binary_data_output",
        _doc(_fp32(), parameters={"binary_data_output": 1}),
        None,
        ["binary_data_output"],
    ),
    ("id not string", _doc(_fp32(), id=5), None, ['"id"']),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, None, ["nested too deeply"]),
]


@pytest.mark.parametrize(
    ("body", "header_length", "fragments"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_raises_invalid_input(
    body: bytes, header_length: int | None, fragments: list[str]
) -> None:
    with pytest.raises(InvalidInput) as info:
        _decode(body, header_length)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_corrupted_bodies_raise_only_invalid_input() -> None:
    """Random byte flips and header lengths: decoding succeeds or raises InvalidInput only."""
    tensors = {"a": (SAMPLES["FP32"], True), "b": (SAMPLES["BYTES"], True)}
    tensors["c"] = (SAMPLES["INT64"], False)
    body, length = _client_body(tensors, outputs=[httpclient.InferRequestedOutput("y")])
    assert length is not None
    rng = np.random.default_rng(7)
    for _ in range(3000):
        corrupted = bytearray(body)
        for pos in rng.integers(0, len(body), size=int(rng.integers(1, 4))):
            corrupted[pos] = int(rng.integers(0, 256))
        header_length = length if rng.random() < 0.8 else int(rng.integers(-2, len(body) + 3))
        with contextlib.suppress(InvalidInput):
            _decode(bytes(corrupted), header_length)


# ------------------------------------------------------------------------------ encoding


def _request(outputs: list[RequestedOutput] | None = None, binary: bool = False) -> InferRequest:
    return InferRequest(model="m", inputs={}, outputs=outputs, binary_output=binary)


@pytest.mark.parametrize("datatype", list(SAMPLES))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoded_output_parsed_by_client(datatype: str, binary: bool) -> None:
    arr = SAMPLES[datatype]
    request = _request([RequestedOutput("y", binary=binary)])
    result, headers = _roundtrip_response({"y": arr}, request, response_id="r9")
    got = result.as_numpy("y")
    if datatype == "BYTES" and not binary:
        # tritonclient keeps JSON strings as str; the bytes are their UTF-8 encoding.
        got = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(got)
    assert got.shape == arr.shape
    assert np.array_equal(got, arr)
    response = result.get_response()
    assert response["model_name"] == "m" and response["model_version"] == "3"
    assert response["id"] == "r9"
    output = response["outputs"][0]
    assert output["datatype"] == datatype and output["shape"] == list(arr.shape)
    assert ("data" in output) != binary
    expected_type = "application/octet-stream" if binary else "application/json"
    assert headers["Content-Type"] == expected_type
    assert (HEADER_LENGTH in headers) == binary


def test_mixed_outputs_follow_request_choices() -> None:
    outputs: dict[str, np.ndarray] = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1, 2, 3], dtype=np.int64),
        "c": np.array([b"x", b"yz"], dtype=object),
        "d": np.array([[0.25]], dtype=np.float64),
    }
    request = _request([RequestedOutput("a", True), RequestedOutput("b", False)], binary=True)
    result, _ = _roundtrip_response(outputs, request)
    by_name = {o["name"]: o for o in result.get_response()["outputs"]}
    assert "data" in by_name["b"]
    for name in ("a", "c", "d"):
        assert by_name[name]["parameters"]["binary_data_size"] > 0 and "data" not in by_name[name]
    for name, arr in outputs.items():
        assert np.array_equal(result.as_numpy(name), arr), name
    assert "id" not in result.get_response()


def test_request_level_binary_output_default() -> None:
    arr = np.array([1.0, 2.0], dtype=np.float32)
    body, headers = encode_infer_response(
        InferResponse("m", "1", {"y": arr}), _request(binary=True)
    )
    assert int(headers[HEADER_LENGTH]) == len(body) - 8
    assert body[-8:] == arr.tobytes()
    result, headers = _roundtrip_response({"y": arr}, _request(binary=True))
    assert result.get_response()["outputs"][0]["parameters"] == {"binary_data_size": 8}
    result, headers = _roundtrip_response({"y": arr}, _request())
    assert result.get_response()["outputs"][0]["data"] == [1.0, 2.0]


def test_json_output_numbers_are_plain() -> None:
    arr = np.array([[0.5, 1.0]], dtype=np.float32)
    body, _ = encode_infer_response(InferResponse("m", "1", {"y": arr}), _request())
    assert json.loads(body)["outputs"][0]["data"] == [0.5, 1.0]


def test_binary_output_non_contiguous_and_big_endian() -> None:
    base = np.arange(12, dtype=">i4").reshape(3, 4)
    arr = base[:, ::2]
    result, _ = _roundtrip_response({"y": arr}, _request(binary=True))
    got = result.as_numpy("y")
    assert got.dtype == np.int32 and np.array_equal(got, arr)


def test_large_batch_response_round_trip() -> None:
    arr = np.random.default_rng(1).standard_normal((2000, 13)).astype(np.float32)
    result, _ = _roundtrip_response({"y": arr}, _request(binary=True))
    assert np.array_equal(result.as_numpy("y"), arr)


def test_unsupported_output_dtype_is_inference_error() -> None:
    with pytest.raises(InferenceError, match='"y"'):
        encode_infer_response(InferResponse("m", "1", {"y": np.zeros(2, np.complex64)}), _request())


def test_non_utf8_bytes_output_needs_binary() -> None:
    arr = np.array([b"\xff"], dtype=object)
    with pytest.raises(InvalidInput, match=r'"y".*binary_data'):
        encode_infer_response(InferResponse("m", "1", {"y": arr}), _request())
    result, _ = _roundtrip_response({"y": arr}, _request(binary=True))
    assert result.as_numpy("y").tolist() == [b"\xff"]


def test_encode_error() -> None:
    assert json.loads(encode_error('bad "x"')) == {"error": 'bad "x"'}
