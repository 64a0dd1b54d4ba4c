"""The KServe v2 gRPC codec: protobuf messages <-> InferRequest / InferResponse.

Only our generated stubs are imported here. Triton's client registers the same ``inference.*``
protobuf symbols, so wire conformance with ``tritonclient.grpc`` is checked in subprocesses
that exchange serialized messages (and numpy ``.npz`` archives) with this process.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if "tritonclient.grpc.service_pb2" in sys.modules:  # e.g. collected after tests/integration
    pytest.skip(
        "tritonclient.grpc is loaded in this process and its inference.* protos clash with "
        "ours; run tests/unit in a pytest process of its own",
        allow_module_level=True,
    )

from mpsserve.errors import InferenceError, InvalidInput
from mpsserve.protocol import grpc_service_pb2 as pb
from mpsserve.protocol.kserve_grpc import (
    decode_infer_request,
    encode_infer_response,
    model_metadata_response,
    server_metadata_response,
)
from mpsserve.types import InferRequest, InferResponse, RequestedOutput

REPO_ROOT = Path(__file__).resolve().parents[2]
Tensor = pb.ModelInferRequest.InferInputTensor


def pack_bytes(items: list[bytes]) -> bytes:
    """BYTES raw layout: each element as a 4-byte little-endian length and the bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def object_array(items: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(shape)


def raw_of(arr: np.ndarray) -> bytes:
    if arr.dtype == object:
        return pack_bytes(list(arr.ravel()))
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def over_the_wire(msg: Any) -> Any:
    """Serialize and parse again, as the server receives it."""
    return type(msg).FromString(msg.SerializeToString())


def raw_request(inputs: dict[str, tuple[str, np.ndarray]], **fields: Any) -> pb.ModelInferRequest:
    """A request carrying every input in raw_input_contents."""
    msg = pb.ModelInferRequest(model_name=fields.pop("model_name", "m"), **fields)
    for name, (datatype, arr) in inputs.items():
        msg.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        msg.raw_input_contents.append(raw_of(arr))
    return msg


TENSORS: dict[str, np.ndarray] = {
    "FP32": np.array([[1.5, -2.25, 3.0e-7], [np.inf, -0.0, 65504.0]], dtype=np.float32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1], [1, -1, 42]], dtype=np.int64),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1], [7, -7, 9]], dtype=np.int32),
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "FP16": np.array([[0.5, -1.0, 65504.0], [1e-4, 0.0, -2.0]], dtype=np.float16),
    "BYTES": object_array([b"a", b"", b"\x00\xff", "é".encode(), b"xyz" * 50, b"z"], (2, 3)),
}
# Typed contents: the field for each datatype (FP16 has none).
CONTENTS: dict[str, tuple[str, np.ndarray]] = {
    "FP32": ("fp32_contents", TENSORS["FP32"]),
    "FP64": ("fp64_contents", np.array([1e300, -1e-300, 0.1], dtype=np.float64)),
    "INT64": ("int64_contents", TENSORS["INT64"]),
    "INT32": ("int_contents", TENSORS["INT32"]),
    "INT16": ("int_contents", np.array([-(2**15), 2**15 - 1], dtype=np.int16)),
    "INT8": ("int_contents", np.array([[-128], [127]], dtype=np.int8)),
    "UINT8": ("uint_contents", np.array([0, 255], dtype=np.uint8)),
    "UINT16": ("uint_contents", np.array([0, 65535], dtype=np.uint16)),
    "UINT32": ("uint_contents", np.array([0, 2**32 - 1], dtype=np.uint32)),
    "UINT64": ("uint64_contents", np.array([0, 2**64 - 1], dtype=np.uint64)),
    "BOOL": ("bool_contents", TENSORS["BOOL"]),
    "BYTES": ("bytes_contents", TENSORS["BYTES"]),
}


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    if want.dtype.kind == "f":
        np.testing.assert_array_equal(got, want)
        assert np.array_equal(np.signbit(got), np.signbit(want))
    else:
        assert np.array_equal(got, want)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("datatype", sorted(TENSORS))
def test_raw_inputs_round_trip(datatype: str) -> None:
    want = TENSORS[datatype]
    msg = over_the_wire(raw_request({"x": (datatype, want)}))
    got = decode_infer_request(msg).inputs["x"]
    assert_same(got, want)
    if datatype == "BYTES":
        assert all(isinstance(e, bytes) for e in got.ravel())


@pytest.mark.parametrize("datatype", sorted(CONTENTS))
def test_typed_contents_round_trip(datatype: str) -> None:
    field, want = CONTENTS[datatype]
    msg = pb.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="x", datatype=datatype, shape=want.shape)
    getattr(tensor.contents, field).extend(want.ravel().tolist())
    got = decode_infer_request(over_the_wire(msg)).inputs["x"]
    assert_same(got, want)


def test_empty_tensor_in_contents() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="x", datatype="FP32", shape=[0, 4])
    tensor.contents.SetInParent()  # present but empty: zero elements
    got = decode_infer_request(over_the_wire(msg)).inputs["x"]
    assert got.shape == (0, 4) and got.dtype == np.float32


def test_large_raw_request_round_trips_and_fp32_is_zero_copy() -> None:
    rng = np.random.default_rng(7)
    rows = 2000
    lengths = rng.integers(0, 6, size=rows).astype(np.int32)
    inputs: dict[str, tuple[str, np.ndarray]] = {
        "dense": ("FP32", rng.standard_normal((rows, 13)).astype(np.float32)),
        "sparse": ("INT64", rng.integers(-(2**62), 2**62, size=(rows, 26), dtype=np.int64)),
        "tags_values": ("INT64", rng.integers(0, 10**9, size=int(lengths.sum()), dtype=np.int64)),
        "tags_lengths": ("INT32", lengths),
    }
    msg = over_the_wire(raw_request(inputs))
    decoded = decode_infer_request(msg)
    assert list(decoded.inputs) == list(inputs)
    for name, (_, want) in inputs.items():
        assert np.array_equal(decoded.inputs[name], want)
        assert decoded.inputs[name].dtype == want.dtype

    dense = decoded.inputs["dense"]
    assert not dense.flags.owndata and not dense.flags.writeable
    base: Any = dense
    while isinstance(base, np.ndarray | memoryview):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    assert isinstance(base, bytes)  # a view on the raw_input_contents buffer itself
    assert base == msg.raw_input_contents[0]
    assert np.shares_memory(dense, np.frombuffer(base, dtype=np.uint8))


def test_request_fields() -> None:
    arr = TENSORS["FP32"]
    msg = raw_request({"x": ("FP32", arr)}, model_name="ctr", model_version="3", id="req-1")
    msg.outputs.add(name="prob")
    msg.outputs.add(name="logits")
    msg.parameters["priority"].uint64_param = 5
    msg.parameters["tag"].string_param = "t"
    msg.parameters["flag"].bool_param = True
    msg.parameters["ratio"].double_param = 0.5
    msg.parameters["timeout"].int64_param = -1
    req = decode_infer_request(over_the_wire(msg))
    assert req.model == "ctr"
    assert req.version == "3"
    assert req.id == "req-1"
    assert req.outputs == [RequestedOutput("prob", binary=True), RequestedOutput("logits", True)]
    assert req.parameters == {"priority": 5, "tag": "t", "flag": True, "ratio": 0.5, "timeout": -1}
    assert req.wants_binary("prob") and req.wants_binary("not-listed")


def test_empty_version_id_and_outputs_are_none() -> None:
    req = decode_infer_request(over_the_wire(raw_request({"x": ("FP32", TENSORS["FP32"])})))
    assert req.version is None
    assert req.id is None
    assert req.outputs is None
    assert req.parameters == {}


def test_request_without_model_name_is_refused() -> None:
    with pytest.raises(InvalidInput, match="model_name"):
        decode_infer_request(pb.ModelInferRequest())


# --------------------------------------------------------------------------- bad requests


def _raw(name: str, datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name=name, datatype=datatype, shape=shape)
    msg.raw_input_contents.append(raw)
    return msg


def _contents(name: str, datatype: str, shape: list[int], **fields: Any) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name=name, datatype=datatype, shape=shape, contents=fields)
    return msg


def _two_inputs_one_raw() -> pb.ModelInferRequest:
    msg = _raw("first", "FP32", [1], b"\x00" * 4)
    msg.inputs.add(name="second", datatype="FP32", shape=[1])
    return msg


def _one_input_two_raws() -> pb.ModelInferRequest:
    msg = _raw("only", "FP32", [1], b"\x00" * 4)
    msg.raw_input_contents.append(b"\x00" * 4)
    return msg


def _raw_and_contents() -> pb.ModelInferRequest:
    msg = _raw("a", "FP32", [1], b"\x00" * 4)
    msg.inputs.add(name="both", datatype="FP32", shape=[1], contents={"fp32_contents": [1.0]})
    msg.raw_input_contents.append(b"\x00" * 4)
    return msg


def _neither() -> pb.ModelInferRequest:
    msg = _contents("a", "FP32", [1], fp32_contents=[1.0])
    msg.inputs.add(name="empty", datatype="FP32", shape=[1])
    return msg


def _duplicate_raw() -> pb.ModelInferRequest:
    msg = _raw("dup", "FP32", [1], b"\x00" * 4)
    msg.inputs.add(name="dup", datatype="FP32", shape=[1])
    msg.raw_input_contents.append(b"\x00" * 4)
    return msg


def _duplicate_contents() -> pb.ModelInferRequest:
    msg = _contents("dup", "INT64", [1], int64_contents=[1])
    msg.inputs.add(name="dup", datatype="INT64", shape=[1], contents={"int64_contents": [2]})
    return msg


def _input_parameter(key: str) -> pb.ModelInferRequest:
    msg = _raw("shm", "FP32", [1], b"\x00" * 4)
    msg.inputs[0].parameters[key].string_param = "region"
    return msg


def _output_parameter(key: str) -> pb.ModelInferRequest:
    msg = _raw("x", "FP32", [1], b"\x00" * 4)
    msg.outputs.add(name="probs").parameters[key].int64_param = 3
    return msg


def _duplicate_output() -> pb.ModelInferRequest:
    msg = _raw("x", "FP32", [1], b"\x00" * 4)
    msg.outputs.add(name="out")
    msg.outputs.add(name="out")
    return msg


def _request_parameter_without_value() -> pb.ModelInferRequest:
    msg = _raw("x", "FP32", [1], b"\x00" * 4)
    msg.parameters["novalue"].SetInParent()
    return msg


BAD_REQUESTS: list[tuple[str, Callable[[], pb.ModelInferRequest], str, str]] = [
    # id, builder, the tensor (or parameter) the message must name, what it must say
    ("unknown-datatype", lambda: _raw("t", "FP8", [1], b"\x00"), "t", "unknown datatype"),
    ("empty-datatype", lambda: _contents("t", "", [1], fp32_contents=[1.0]), "t", "datatype"),
    ("negative-shape", lambda: _raw("neg", "FP32", [-1, 3], b""), "neg", "non-negative"),
    ("huge-shape", lambda: _raw("big", "FP32", [2**40] * 2, b""), "big", "too large"),
    ("raw-too-short", lambda: _raw("short", "FP32", [2, 3], b"\x00" * 20), "short", "24"),
    ("raw-too-long", lambda: _raw("long", "INT64", [2], b"\x00" * 17), "long", "16"),
    ("fewer-raw-than-inputs", _two_inputs_one_raw, "second", "raw_input_contents"),
    ("more-raw-than-inputs", _one_input_two_raws, "only", "raw_input_contents"),
    (
        "contents-count",
        lambda: _contents("cnt", "FP32", [2, 2], fp32_contents=[1.0, 2.0, 3.0]),
        "cnt",
        "needs 4 elements",
    ),
    ("raw-and-contents", _raw_and_contents, "both", "both"),
    ("neither", _neither, "empty", "neither"),
    ("duplicate-raw", _duplicate_raw, "dup", "duplicate"),
    ("duplicate-contents", _duplicate_contents, "dup", "duplicate"),
    (
        "wrong-contents-field",
        lambda: _contents("wf", "FP32", [1], int64_contents=[1]),
        "wf",
        "contents.fp32_contents",
    ),
    (
        "extra-contents-field",
        lambda: _contents("xf", "INT32", [1], int_contents=[1], bool_contents=[True]),
        "xf",
        "not contents.bool_contents",
    ),
    (
        "int64-in-int-contents",
        lambda: _contents("i64", "INT64", [1], int_contents=[1]),
        "i64",
        "contents.int64_contents",
    ),
    (
        "fp16-in-contents",
        lambda: _contents("half", "FP16", [1], fp32_contents=[1.0]),
        "half",
        "raw_input_contents",
    ),
    (
        "int8-out-of-range",
        lambda: _contents("small", "INT8", [2], int_contents=[1, 128]),
        "small",
        "out of range",
    ),
    (
        "uint16-out-of-range",
        lambda: _contents("u16", "UINT16", [1], uint_contents=[65536]),
        "u16",
        "out of range",
    ),
    (
        "bytes-prefix-truncated",
        lambda: _raw("s", "BYTES", [1], b"\x05\x00"),
        "s",
        "length prefix",
    ),
    (
        "bytes-element-overruns",
        lambda: _raw("s", "BYTES", [1], b"\x05\x00\x00\x00ab"),
        "s",
        "overruns",
    ),
    (
        "bytes-count",
        lambda: _raw("s", "BYTES", [3], pack_bytes([b"a", b"b"])),
        "s",
        "needs 3 BYTES elements",
    ),
    ("input-shared-memory", lambda: _input_parameter("shared_memory_region"), "shm", "shared"),
    ("output-classification", lambda: _output_parameter("classification"), "probs", "class"),
    ("output-shared-memory", lambda: _output_parameter("shared_memory_region"), "probs", "shared"),
    ("duplicate-output", _duplicate_output, "out", "duplicate output"),
    ("parameter-without-value", _request_parameter_without_value, "novalue", "no value"),
]


@pytest.mark.parametrize(
    ("build", "name", "problem"),
    [pytest.param(build, name, problem, id=case) for case, build, name, problem in BAD_REQUESTS],
)
def test_bad_request_raises_invalid_input_naming_the_tensor(
    build: Callable[[], pb.ModelInferRequest], name: str, problem: str
) -> None:
    msg = over_the_wire(build())
    with pytest.raises(InvalidInput) as info:
        decode_infer_request(msg)
    text = str(info.value)
    assert f'"{name}"' in text, text
    assert problem in text, text


def test_unnamed_input_and_output_are_refused() -> None:
    msg = _raw("", "FP32", [1], b"\x00" * 4)
    with pytest.raises(InvalidInput, match=r"inputs\[0\]"):
        decode_infer_request(msg)
    msg = _raw("x", "FP32", [1], b"\x00" * 4)
    msg.outputs.add(name="")
    with pytest.raises(InvalidInput, match=r"outputs\[0\]"):
        decode_infer_request(msg)


# --------------------------------------------------------------------------- encoding


def _request(**kwargs: Any) -> InferRequest:
    return InferRequest(model="m", inputs={}, **kwargs)


def parse_outputs(msg: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decode raw_output_contents with numpy alone, as any client would."""
    numpy_of = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "BOOL": "?"}
    out: dict[str, np.ndarray] = {}
    assert len(msg.outputs) == len(msg.raw_output_contents)
    for tensor, raw in zip(msg.outputs, msg.raw_output_contents, strict=True):
        shape = tuple(tensor.shape)
        if tensor.datatype == "BYTES":
            items, offset = [], 0
            while offset < len(raw):
                (length,) = struct.unpack_from("<I", raw, offset)
                items.append(raw[offset + 4 : offset + 4 + length])
                offset += 4 + length
            out[tensor.name] = object_array(items, shape)
        else:
            out[tensor.name] = np.frombuffer(raw, dtype=numpy_of[tensor.datatype]).reshape(shape)
    return out


def test_encode_fp32_and_bytes_outputs_decode_back() -> None:
    probs = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    labels = object_array([b"cat", b"", "dög".encode(), b"\x00\x01"], (2, 2))
    response = InferResponse(
        model="ctr", version="7", outputs={"probs": probs, "labels": labels}, id="abc"
    )
    msg = over_the_wire(encode_infer_response(response, _request(id="abc")))
    assert (msg.model_name, msg.model_version, msg.id) == ("ctr", "7", "abc")
    assert [(t.name, t.datatype, list(t.shape)) for t in msg.outputs] == [
        ("probs", "FP32", [4, 6]),
        ("labels", "BYTES", [2, 2]),
    ]
    assert not any(t.HasField("contents") for t in msg.outputs)
    decoded = parse_outputs(msg)
    assert_same(decoded["probs"], probs)
    assert np.array_equal(decoded["labels"], labels)


def test_encode_is_little_endian_row_major_whatever_the_layout() -> None:
    big_endian = np.arange(6, dtype=">i8").reshape(2, 3)
    transposed = np.arange(6, dtype=np.float64).reshape(3, 2).T  # not C-contiguous
    strings = np.array(["ab", "ç"])  # numpy str: BYTES as UTF-8
    response = InferResponse(
        model="m",
        version="1",
        outputs={
            "be": big_endian,
            "t": transposed,
            "s": strings,
            "scalar": np.asarray(np.float32(2.5)),
        },
    )
    msg = encode_infer_response(response, _request())
    decoded = parse_outputs(msg)
    assert np.array_equal(decoded["be"], big_endian) and decoded["be"].dtype == "<i8"
    assert np.array_equal(decoded["t"], transposed)
    assert list(decoded["s"]) == [b"ab", "ç".encode()]
    assert decoded["scalar"].shape == () and decoded["scalar"] == np.float32(2.5)


def test_encode_id_falls_back_to_the_request_and_may_be_empty() -> None:
    response = InferResponse(model="m", version="1", outputs={})
    assert encode_infer_response(response, _request(id="from-req")).id == "from-req"
    msg = encode_infer_response(response, _request())
    assert msg.id == "" and len(msg.outputs) == 0 and len(msg.raw_output_contents) == 0


@pytest.mark.parametrize(
    "bad",
    [np.array([1 + 2j], dtype=np.complex64), object_array([b"a", 3], (2,))],  # type: ignore[list-item]
    ids=["complex", "bytes-holding-int"],
)
def test_encode_output_the_wire_cannot_carry_is_a_model_error(bad: np.ndarray) -> None:
    response = InferResponse(model="m", version="1", outputs={"weird": bad})
    with pytest.raises(InferenceError, match='"weird"'):
        encode_infer_response(response, _request())


# --------------------------------------------------------------------------- metadata


def test_model_metadata_response() -> None:
    metadata = {
        "name": "ctr",
        "versions": ["1", 2],
        "platform": "tensorflow_savedmodel",
        "inputs": [
            {"name": "dense", "dtype": "float32", "shape": [-1, 13]},
            {"name": "ids", "dtype": "int64", "shape": [-1, 26], "min_value": 0},
            {"name": "text", "dtype": "object", "shape": [None]},
            {"name": "half", "dtype": "float16", "shape": [-1]},
            {"name": "flag", "dtype": "bool", "shape": []},
        ],
        "outputs": [{"name": "prob", "dtype": "float32", "shape": [-1, 1]}],
        "ragged_features": ["tags"],  # extra keys are not part of the message
        "device": "GPU:0",
    }
    msg = over_the_wire(model_metadata_response(metadata))
    assert msg.name == "ctr"
    assert list(msg.versions) == ["1", "2"]
    assert msg.platform == "tensorflow_savedmodel"
    assert [(t.name, t.datatype, list(t.shape)) for t in msg.inputs] == [
        ("dense", "FP32", [-1, 13]),
        ("ids", "INT64", [-1, 26]),
        ("text", "BYTES", [-1]),
        ("half", "FP16", [-1]),
        ("flag", "BOOL", []),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in msg.outputs] == [("prob", "FP32", [-1, 1])]


def test_model_metadata_with_unmappable_dtype_is_a_server_error() -> None:
    metadata = {"name": "m", "inputs": [{"name": "z", "dtype": "complex64", "shape": [1]}]}
    with pytest.raises(InferenceError, match='"z"'):
        model_metadata_response(metadata)


def test_server_metadata_response() -> None:
    msg = over_the_wire(
        server_metadata_response(
            {"name": "mpsserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
        )
    )
    assert (msg.name, msg.version, list(msg.extensions)) == (
        "mpsserve",
        "0.1.0",
        ["binary_tensor_data"],
    )


# --------------------------------------------------------------------------- wire conformance
# tritonclient.grpc runs in a subprocess; bytes and .npz archives cross the process boundary.

_TRITON_SCRIPT = r"""
import io, json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request

mode = sys.argv[1]
data = sys.stdin.buffer.read()
if mode == "parse-request":
    msg = service_pb2.ModelInferRequest.FromString(data)
    fields = {}
    for key, param in msg.parameters.items():
        fields[key] = getattr(param, param.WhichOneof("parameter_choice"))
    doc = {
        "model_name": msg.model_name,
        "model_version": msg.model_version,
        "id": msg.id,
        "parameters": fields,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
             "fp32_contents": list(t.contents.fp32_contents)}
            for t in msg.inputs
        ],
        "outputs": [t.name for t in msg.outputs],
        "raw_input_contents": [raw.hex() for raw in msg.raw_input_contents],
    }
    sys.stdout.write(json.dumps(doc))
elif mode == "build-request":
    arrays = np.load(io.BytesIO(data), allow_pickle=True)
    inputs = []
    for name in arrays.files:
        arr = arrays[name]
        datatype = "BYTES" if arr.dtype == object else triton.np_to_triton_dtype(arr.dtype)
        tensor = triton.InferInput(name, list(arr.shape), datatype)
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput("prob"), triton.InferRequestedOutput("emb")]
    request = _get_inference_request(
        model_name="ctr", inputs=inputs, model_version="2", request_id="r-9", outputs=outputs,
        sequence_id=0, sequence_start=False, sequence_end=False, priority=3, timeout=None,
        parameters={"custom": "yes"},
    )
    sys.stdout.buffer.write(request.SerializeToString())
elif mode == "parse-response":
    msg = service_pb2.ModelInferResponse.FromString(data)
    result = triton.InferResult(msg)
    out = io.BytesIO()
    np.savez(out, **{t.name: result.as_numpy(t.name) for t in msg.outputs})
    meta = {"model_name": msg.model_name, "model_version": msg.model_version, "id": msg.id}
    sys.stdout.buffer.write(json.dumps(meta).encode() + b"\n" + out.getvalue())
"""


def run_triton(mode: str, data: bytes) -> bytes:
    """Run the tritonclient side in a fresh interpreter (its protobuf symbols clash with ours)."""
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT, mode],
        input=data,
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def test_tritonclient_parses_our_request() -> None:
    dense = np.arange(12, dtype=np.float32).reshape(3, 4) / 8
    ids = np.array([[1, -2], [3, 2**40]], dtype=np.int64)
    typed = pb.ModelInferRequest(model_name="ctr", model_version="5", id="q-1")
    typed.inputs.add(name="dense", datatype="FP32", shape=dense.shape).contents.fp32_contents[:] = (
        dense.ravel().tolist()
    )
    typed.inputs.add(name="ids", datatype="INT64", shape=ids.shape).contents.int64_contents[:] = (
        ids.ravel().tolist()
    )
    typed.outputs.add(name="prob")
    typed.parameters["priority"].uint64_param = 2
    typed.parameters["tag"].string_param = "x"

    doc = json.loads(run_triton("parse-request", typed.SerializeToString()))
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("ctr", "5", "q-1")
    assert doc["parameters"] == {"priority": 2, "tag": "x"}
    assert [(t["name"], t["datatype"], t["shape"]) for t in doc["inputs"]] == [
        ("dense", "FP32", [3, 4]),
        ("ids", "INT64", [2, 2]),
    ]
    assert doc["inputs"][0]["fp32_contents"] == dense.ravel().tolist()
    assert doc["outputs"] == ["prob"]
    assert doc["raw_input_contents"] == []

    raw = raw_request({"dense": ("FP32", dense), "ids": ("INT64", ids)}, model_name="ctr")
    doc = json.loads(run_triton("parse-request", raw.SerializeToString()))
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("ctr", "", "")
    assert [bytes.fromhex(h) for h in doc["raw_input_contents"]] == [
        dense.tobytes(),
        ids.astype("<i8").tobytes(),
    ]


def test_we_decode_a_request_built_by_tritonclient() -> None:
    arrays = {
        "dense": np.arange(26, dtype=np.float32).reshape(2, 13) - 3.5,
        "sparse": np.arange(52, dtype=np.int64).reshape(2, 26) * 2**33,
        "lengths": np.array([3, 0], dtype=np.int32),
        "mask": np.array([[True, False]]),
        "half": np.array([1.5, -2.0], dtype=np.float16),
        "text": object_array([b"hello", b"", "wörld".encode()], (3, 1)),
    }
    archive = io.BytesIO()
    np.savez(archive, **arrays)  # type: ignore[arg-type]
    wire = run_triton("build-request", archive.getvalue())

    req = decode_infer_request(pb.ModelInferRequest.FromString(wire))
    assert (req.model, req.version, req.id) == ("ctr", "2", "r-9")
    assert req.outputs == [RequestedOutput("prob", True), RequestedOutput("emb", True)]
    assert req.parameters == {"priority": 3, "custom": "yes"}
    assert list(req.inputs) == list(arrays)
    for name, want in arrays.items():
        assert_same(req.inputs[name], want)


def test_tritonclient_reads_our_response() -> None:
    outputs: dict[str, np.ndarray] = {
        "prob": np.linspace(0, 1, 10, dtype=np.float32).reshape(5, 2),
        "ids": np.array([[7, -8, 2**50]], dtype=np.int64),
        "ok": np.array([True, False, True]),
        "half": np.array([0.25, 1024.0], dtype=np.float16),
        "names": object_array([b"a", b"bc", b""], (3,)),
    }
    response = InferResponse(model="ctr", version="4", outputs=outputs, id="z")
    wire = encode_infer_response(response, _request(id="z")).SerializeToString()

    meta_line, archive = run_triton("parse-response", wire).split(b"\n", 1)
    assert json.loads(meta_line) == {"model_name": "ctr", "model_version": "4", "id": "z"}
    with np.load(io.BytesIO(archive), allow_pickle=True) as got:
        assert sorted(got.files) == sorted(outputs)
        for name, want in outputs.items():
            if want.dtype == object:
                assert list(got[name]) == list(want)
            else:
                assert_same(got[name], want)
