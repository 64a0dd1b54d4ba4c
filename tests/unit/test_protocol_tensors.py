"""The tensor codec every protocol shares: datatypes, raw bytes, BYTES, shapes, JSON numbers.

The protocols' own tests (test_protocol_kserve*, test_protocol_tfserving, test_frame_and_router)
check the codec through real clients; these pin its contract directly, so a change to it
shows here first, with the two JSON policies side by side.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest

from mpsserve.errors import InferenceError, InvalidInput
from mpsserve.protocol.tensors import (
    DATATYPE_TO_NUMPY,
    KSERVE_JSON,
    TFSERVING_JSON,
    JsonPolicy,
    check_shape,
    elements_as_bytes,
    json_array,
    json_cast,
    numpy_to_datatype,
    object_array,
    pack_bytes,
    raw_view,
    tensor_bytes,
    tensor_from_bytes,
    unpack_bytes,
)

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 1, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[-65504.0, 0.5, np.inf]], dtype=np.float16),
    "FP32": np.array([[-1.5, np.nan, 3.4e38]], dtype=np.float32),
    "FP64": np.array([[-1e300, 2.5, -np.inf]], dtype=np.float64),
    "BYTES": object_array([b"a", b"", "é".encode(), b"\0z"]).reshape(2, 2),
}


def _bytes(raw: bytes | memoryview) -> memoryview:
    return memoryview(bytes(raw))


# ------------------------------------------------------------------------------ datatypes


def test_every_datatype_has_a_sample() -> None:
    assert set(SAMPLES) == set(DATATYPE_TO_NUMPY)


def test_numpy_to_datatype_inverts_the_table_for_any_byte_order() -> None:
    for name, dtype in DATATYPE_TO_NUMPY.items():
        assert numpy_to_datatype(dtype) == name
        assert numpy_to_datatype(dtype.newbyteorder(">")) == name
    assert numpy_to_datatype(np.float32) == "FP32"
    assert numpy_to_datatype(np.dtype("S3")) == "BYTES"
    assert numpy_to_datatype(np.dtype("U2")) == "BYTES"


@pytest.mark.parametrize("dtype", [np.complex64, np.dtype("M8[s]"), np.longdouble])
def test_numpy_to_datatype_refuses_what_the_wire_lacks(dtype: Any) -> None:
    with pytest.raises(ValueError, match="no KServe v2 datatype"):
        numpy_to_datatype(dtype)


# ------------------------------------------------------------------------------ raw bytes


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_round_trip_through_wire_bytes(datatype: str) -> None:
    arr = SAMPLES[datatype]
    raw = tensor_bytes("x", arr, datatype)
    got = tensor_from_bytes("x", datatype, list(arr.shape), _bytes(raw), "data")
    assert got.dtype == DATATYPE_TO_NUMPY[datatype]
    assert got.shape == arr.shape
    if datatype == "BYTES":
        assert got.tolist() == arr.tolist()
    else:
        assert np.array_equal(got, arr, equal_nan=arr.dtype.kind == "f")


def test_numeric_bytes_are_little_endian_row_major() -> None:
    arr = np.arange(6, dtype=">i4").reshape(2, 3).T  # big-endian and not contiguous
    raw = bytes(tensor_bytes("x", arr, "INT32"))
    assert raw == struct.pack("<6i", 0, 3, 1, 4, 2, 5)


def test_raw_view_does_not_copy_a_contiguous_little_endian_tensor() -> None:
    arr = np.arange(12, dtype="<f4").reshape(3, 4)
    view = raw_view(arr)
    assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), arr)
    assert view.nbytes == arr.nbytes


def test_decoded_numeric_tensor_is_a_view_on_the_bytes() -> None:
    body = bytearray(struct.pack("<4f", 1, 2, 3, 4))
    got = tensor_from_bytes("x", "FP32", [2, 2], memoryview(body), "data")
    assert np.shares_memory(got, np.frombuffer(body, dtype=np.uint8))
    assert got.flags.writeable  # a bytearray stays writable; bytes would not
    readonly = tensor_from_bytes("x", "FP32", [2, 2], memoryview(bytes(body)), "data")
    assert not readonly.flags.writeable


def test_empty_tensor_round_trips() -> None:
    arr = np.empty((0, 5), dtype=np.float32)
    got = tensor_from_bytes("x", "FP32", [0, 5], _bytes(tensor_bytes("x", arr, "FP32")), "data")
    assert got.shape == (0, 5) and got.dtype == np.float32


def test_byte_count_must_match_shape() -> None:
    with pytest.raises(InvalidInput) as info:
        tensor_from_bytes("dense", "FP32", [3], _bytes(b"\0" * 8), "binary_data_size")
    assert info.value.message == (
        'input "dense": binary_data_size is 8 bytes but shape [3] of FP32 needs 12'
    )


# ------------------------------------------------------------------------------ BYTES


def test_bytes_layout_is_length_prefixed() -> None:
    arr = np.array(["ab", "", "é"], dtype=object)  # str elements travel as UTF-8
    assert pack_bytes("s", arr) == b"\2\0\0\0ab" + b"\0\0\0\0" + b"\2\0\0\0\xc3\xa9"
    got = unpack_bytes("s", _bytes(pack_bytes("s", arr)), 3)
    assert got.dtype == object and got.tolist() == [b"ab", b"", "é".encode()]


def test_fixed_width_bytes_arrays_pack_like_object_arrays() -> None:
    fixed = np.array([b"a", b"bcd"])  # numpy's S3
    assert pack_bytes("s", fixed) == pack_bytes("s", object_array([b"a", b"bcd"]))


def test_object_array_keeps_elements_as_they_are() -> None:
    arr = object_array([b"a\0", b""])  # np.array would strip the NUL and pad to S2
    assert arr.dtype == object and arr.shape == (2,)
    assert arr.tolist() == [b"a\0", b""]


def test_elements_as_bytes_refuses_what_is_not_text() -> None:
    assert elements_as_bytes("y", np.array(["x", b"y"], dtype=object)) == [b"x", b"y"]
    with pytest.raises(InferenceError, match='output "y": BYTES elements must be bytes or str'):
        elements_as_bytes("y", np.array([b"x", 3], dtype=object))


@pytest.mark.parametrize(
    ("raw", "count", "problem"),
    [
        (struct.pack("<I", 1) + b"a" + b"\0", 2, "BYTES data ends inside a length prefix"),
        (struct.pack("<I", 9) + b"a", 1, "BYTES element 0 overruns its data"),
        (struct.pack("<I", 1) + b"a", 2, "shape needs 2 BYTES elements, binary data has 1"),
        (b"", 1, "shape needs 1 BYTES elements, binary data has 0"),
    ],
    ids=["truncated prefix", "overrun", "too few", "none"],
)
def test_bad_bytes_data(raw: bytes, count: int, problem: str) -> None:
    with pytest.raises(InvalidInput) as info:
        unpack_bytes("tok", _bytes(raw), count)
    assert info.value.message == f'input "tok": {problem}'


# ------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("shape", [[], [0], [3, 0, 2], [2000, 13], [1] * 32])
def test_good_shapes_pass(shape: list[int]) -> None:
    assert check_shape("x", shape) is shape


@pytest.mark.parametrize(
    ("shape", "problem"),
    [
        (None, "must be a list of non-negative integers"),
        (3, "must be a list of non-negative integers"),
        ((2, 3), "must be a list of non-negative integers"),  # a tuple is not a JSON list
        ([-1], "must be a list of non-negative integers"),
        ([2.0], "must be a list of non-negative integers"),
        ([True, 2], "must be a list of non-negative integers"),
        (["2"], "must be a list of non-negative integers"),
        ([1] * 33, "is too large"),
        ([0, 2**70], "is too large"),  # empty, but numpy could not make it
        ([2**30, 2**30], "is too large"),
    ],
)
def test_bad_shapes_are_refused_naming_the_tensor(shape: Any, problem: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_shape("dense", shape)
    assert info.value.message.startswith('input "dense": "shape" ')
    assert problem in info.value.message


# ------------------------------------------------------------------------------ JSON numbers


def _cast(value: Any, dtype: Any, policy: JsonPolicy, name: str = "x") -> np.ndarray:
    return json_cast(name, json_array(name, value, policy), np.dtype(dtype), policy)


def _refusal(value: Any, dtype: Any, policy: JsonPolicy) -> str:
    with pytest.raises(InvalidInput) as info:
        _cast(value, dtype, policy, name="dense")
    return info.value.message


POLICIES = pytest.mark.parametrize("policy", [KSERVE_JSON, TFSERVING_JSON], ids=["kserve", "tf"])


@POLICIES
@pytest.mark.parametrize(
    ("value", "dtype", "expected"),
    [
        ([1, 2.5, -3], "<f4", np.array([1, 2.5, -3], dtype=np.float32)),
        ([[1, 2], [3, 4]], "<i1", np.array([[1, 2], [3, 4]], dtype=np.int8)),
        ([2**63, 2**64 - 1], "<u8", np.array([2**63, 2**64 - 1], dtype=np.uint64)),
        ([-(2**63), 2**63 - 1], "<i8", np.array([-(2**63), 2**63 - 1], dtype=np.int64)),
        ([True, False], np.bool_, np.array([True, False])),
        ([65504, -65504.0], "<f2", np.array([65504, -65504], dtype=np.float16)),
        (7, "<i4", np.array(7, dtype=np.int32)),
        ([], "<i8", np.empty(0, dtype=np.int64)),
        ([[], []], "<f4", np.empty((2, 0), dtype=np.float32)),
    ],
)
def test_json_numbers_convert_exactly(
    value: Any, dtype: Any, expected: np.ndarray, policy: JsonPolicy
) -> None:
    got = _cast(value, dtype, policy)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)


@POLICIES
@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        ([1.0, 2], "<i4"),  # integer targets take only JSON integers, as TF Serving does
        ([1.5], "<u1"),
        ([True, False], "<i1"),  # booleans are not numbers
        ([1, 0], np.bool_),
        (["1"], "<f4"),
        ([1, None], "<f4"),
        ([1, {}], "<f8"),
    ],
)
def test_both_policies_refuse_lossy_kinds(value: Any, dtype: Any, policy: JsonPolicy) -> None:
    message = _refusal(value, dtype, policy)
    assert message.startswith('input "dense": ')
    assert "not convertible" in message


@POLICIES
@pytest.mark.parametrize(
    ("value", "dtype"),
    [([1, 256], "<u1"), ([-1], "<u4"), ([-129], "<i1"), ([2**31], "<i4"), ([70000], "<f2")],
)
def test_both_policies_refuse_values_out_of_range(
    value: Any, dtype: Any, policy: JsonPolicy
) -> None:
    message = _refusal(value, dtype, policy)
    assert message.startswith('input "dense": ') and "out of range" in message


@POLICIES
def test_both_policies_refuse_ragged_lists(policy: JsonPolicy) -> None:
    assert _refusal([[1, 2], [3]], "<f4", policy) == f'input "dense": {policy.ragged}'


def test_the_policies_word_their_messages_as_their_protocols_do() -> None:
    assert _refusal([1.5], "<i4", KSERVE_JSON) == (
        'input "dense": "data" is not convertible to INT32'
    )
    assert _refusal([1.5], "<i4", TFSERVING_JSON) == (
        'input "dense": values are not convertible to int32'
    )
    assert _refusal([1e39], "<f4", KSERVE_JSON) == (
        'input "dense": "data" has values out of range for FP32'
    )
    assert _refusal([1e39], "<f4", TFSERVING_JSON) == (
        'input "dense": values out of range for float32'
    )
    assert _refusal([[1], [2, 3]], "<f4", KSERVE_JSON) == (
        'input "dense": "data" is a ragged nested list'
    )
    assert _refusal([[1], [2, 3]], "<f4", TFSERVING_JSON) == (
        'input "dense": value is ragged or nested too deeply'
    )


@pytest.mark.parametrize("text", ["1e39", "-1e39", "1e999", "-1e999"])
def test_kserve_refuses_floats_that_overflow_the_type(text: str) -> None:
    value = json.loads(f"[1.0, {text}]")  # Python reads 1e999 as infinity
    assert "out of range for FP32" in _refusal(value, "<f4", KSERVE_JSON)


def test_kserve_refuses_non_finite_floats_even_in_fp64() -> None:
    for value in (math.inf, -math.inf, math.nan):
        assert "out of range for FP64" in _refusal([0.0, value], "<f8", KSERVE_JSON)
    assert _cast([1e308], "<f8", KSERVE_JSON)[0] == 1e308


def test_tfserving_takes_nan_and_infinity() -> None:
    value = json.loads("[NaN, Infinity, -Infinity, 1.5]")
    got = _cast(value, "<f4", TFSERVING_JSON)
    assert got.dtype == np.float32
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf and got[3] == 1.5


def test_tfserving_checks_the_range_of_finite_values_only() -> None:
    assert _cast([math.inf, 3e38], "<f4", TFSERVING_JSON)[1] == np.float32(3e38)
    assert "out of range for float32" in _refusal([math.nan, 1e39], "<f4", TFSERVING_JSON)
    assert "out of range for float16" in _refusal([-math.inf, 70000], "<f2", TFSERVING_JSON)


def test_tfserving_refuses_infinity_for_integer_inputs() -> None:
    value = json.loads("[1, Infinity]")
    assert "not convertible to int64" in _refusal(value, "<i8", TFSERVING_JSON)


def test_tfserving_refuses_non_numeric_targets_unless_empty() -> None:
    assert "not convertible to <U3" in _refusal(["abc"], "<U3", TFSERVING_JSON)
    assert _cast([], "<U3", TFSERVING_JSON).dtype == np.dtype("<U3")


def test_json_cast_does_not_copy_when_the_dtype_already_matches() -> None:
    arr = json_array("x", [1.5, 2.5], KSERVE_JSON)  # numpy's float64
    assert json_cast("x", arr, np.dtype("<f8"), KSERVE_JSON) is arr
