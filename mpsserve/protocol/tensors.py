"""The one tensor codec: wire datatypes, raw tensor bytes and JSON numbers <-> numpy arrays.

Every wire format carries tensors the same way, so they share this module: KServe v2 REST
(``protocol.kserve``: JSON data and the binary-tensor extension), KServe v2 gRPC
(``protocol.kserve_grpc``: raw_input_contents and typed contents), TF-Serving REST
(``protocol.tfserving``: JSON values) and the ingress-to-replica frame (``protocol.frame``).
Pure numpy: no JSON parser, no protobuf, no transport.

Raw layout (KServe v2's, Triton's ``binary_tensor_data``): numeric tensors are little-endian
and row-major, whatever the host is; a BYTES tensor is its elements in row-major order, each a
4-byte little-endian length and the bytes. Decoded numeric tensors are views on the wire bytes
(no copy; read-only when the bytes are).

Malformed input raises ``InvalidInput`` naming the tensor and the problem; an output the wire
cannot carry raises ``InferenceError`` (a model bug).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpsserve.errors import InferenceError, InvalidInput
from mpsserve.text import quote

# Explicit little-endian dtypes: the wire is little-endian whatever the host is.
DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_BY_KIND_SIZE = {(d.kind, d.itemsize): n for n, d in DATATYPE_TO_NUMPY.items() if n != "BYTES"}
_LENGTH = struct.Struct("<I")
_MAX_DIMS = 32
_MAX_ELEMENTS = 2**59  # times the largest itemsize (8) stays below numpy's size limit


def numpy_to_datatype(dtype: np.dtype | type) -> str:
    """Wire datatype of a numpy dtype (any byte order); ValueError if the wire has none."""
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    name = _BY_KIND_SIZE.get((dt.kind, dt.itemsize))
    if name is None:
        raise ValueError(f"numpy dtype {dt} has no KServe v2 datatype")
    return name


def check_shape(name: str, shape: Any) -> list[int]:
    """Validate a peer's shape: a list of non-negative ints (booleans are not ints here).

    Dimensions numpy cannot represent are refused even for empty tensors, where no byte count
    would catch them.
    """
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(
            f'input {quote(name)}: "shape" must be a list of non-negative integers, '
            f"got {quote(str(shape))}"
        )
    if len(shape) > _MAX_DIMS or math.prod(d or 1 for d in shape) > _MAX_ELEMENTS:
        raise InvalidInput(f'input {quote(name)}: "shape" {shape} is too large')
    return shape


def tensor_from_bytes(
    name: str, datatype: str, shape: list[int], raw: memoryview, field: str
) -> np.ndarray:
    """View raw little-endian bytes as the tensor (zero-copy for every numeric datatype);
    ``field`` names where the bytes came from, for the error message."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return unpack_bytes(name, raw, count).reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {quote(name)}: {field} is {len(raw)} bytes but shape {shape} of {datatype} "
            f"needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def tensor_bytes(name: str, arr: np.ndarray, datatype: str) -> bytes | memoryview:
    """The tensor's wire bytes: a zero-copy view for numeric data, length-prefixed BYTES."""
    return pack_bytes(name, arr) if datatype == "BYTES" else raw_view(arr)


def raw_view(arr: np.ndarray) -> memoryview:
    """Little-endian row-major bytes of a numeric tensor; copies only if layout demands it."""
    flat = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).reshape(-1)
    return flat.view(np.uint8).data


def unpack_bytes(name: str, raw: memoryview, count: int) -> np.ndarray:
    """Split ``count`` length-prefixed BYTES elements into a flat object array of ``bytes``."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {quote(name)}: BYTES data ends inside a length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"input {quote(name)}: BYTES element {len(items)} overruns its data")
        items.append(raw[offset : offset + length].tobytes())
        offset += length
    if len(items) != count:
        raise InvalidInput(
            f"input {quote(name)}: shape needs {count} BYTES elements, binary data has {len(items)}"
        )
    return object_array(items)


def pack_bytes(name: str, arr: np.ndarray) -> bytes:
    """Length-prefixed BYTES elements, concatenated in row-major order."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in elements_as_bytes(name, arr))


def elements_as_bytes(name: str, arr: np.ndarray) -> list[bytes]:
    """BYTES elements as ``bytes`` (``str`` is UTF-8 encoded; anything else is a model bug)."""
    items = arr.ravel().tolist()
    if not all(isinstance(e, (bytes, str)) for e in items):
        raise InferenceError(f"output {quote(name)}: BYTES elements must be bytes or str")
    return [e.encode("utf-8") if isinstance(e, str) else e for e in items]


def object_array(items: list[bytes]) -> np.ndarray:
    """A flat object array holding ``items`` as-is (np.array would make a fixed-width S array)."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


@dataclass(frozen=True)
class JsonPolicy:
    """How one protocol reads decoded JSON numbers into a tensor: its words for each problem
    (after ``input "<name>": ``; ``{type}`` is the target type) and its rule for non-finite
    floats."""

    non_finite: bool  # NaN and infinities pass; the range is checked on finite values only
    wire_names: bool  # name the target as its wire datatype (FP32; a DATATYPE_TO_NUMPY dtype)
    ragged: str
    not_convertible: str
    out_of_range: str


# KServe v2 JSON has no NaN or infinity (the parser refuses them), so a float that overflows
# the type, 1e39 for FP32 or 1e999 (which Python reads as infinity), would become an infinity
# no client sent: refused.
KSERVE_JSON = JsonPolicy(
    non_finite=False,
    wire_names=True,
    ragged='"data" is a ragged nested list',
    not_convertible='"data" is not convertible to {type}',
    out_of_range='"data" has values out of range for {type}',
)
# TF Serving's REST API takes NaN, Infinity and -Infinity as float values.
TFSERVING_JSON = JsonPolicy(
    non_finite=True,
    wire_names=False,
    ragged="value is ragged or nested too deeply",
    not_convertible="values are not convertible to {type}",
    out_of_range="values out of range for {type}",
)
# numpy kinds that ``np.array(json_value)`` may produce and that each target kind accepts:
# integer targets take only JSON integers (2.0 is refused), booleans are not numbers.
_JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}


def json_array(name: str, value: Any, policy: JsonPolicy) -> np.ndarray:
    """A decoded JSON value (a number or nested lists) as numpy makes it, not yet cast: apart
    from ``json_cast`` so that a protocol checks what it must first (KServe the element count,
    TF Serving ``{"b64": ...}`` objects) and its errors keep their order."""
    try:
        return np.array(value)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input {quote(name)}: {policy.ragged}") from None


def json_cast(name: str, arr: np.ndarray, dtype: np.dtype, policy: JsonPolicy) -> np.ndarray:
    """``json_array``'s result as ``dtype``, refusing every lossy conversion."""
    if arr.size == 0:
        return arr.astype(dtype)
    if arr.dtype.kind not in _JSON_KINDS.get(dtype.kind, ""):
        raise _json_error(name, policy.not_convertible, dtype, policy)
    if not _in_range(arr, dtype, policy.non_finite):
        raise _json_error(name, policy.out_of_range, dtype, policy)
    return arr.astype(dtype, copy=False)


def _in_range(arr: np.ndarray, dtype: np.dtype, non_finite: bool) -> bool:
    """Whether every value fits ``dtype`` (NaN and infinities only where ``non_finite``)."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return int(arr.min()) >= info.min and int(arr.max()) <= info.max
    if dtype.kind != "f":
        return True
    values = arr.astype(np.float64, copy=False)
    if non_finite:
        values = values[np.isfinite(values)]
    return bool(np.all(np.abs(values) <= np.finfo(dtype).max))


def _json_error(name: str, template: str, dtype: np.dtype, policy: JsonPolicy) -> InvalidInput:
    type_name = numpy_to_datatype(dtype) if policy.wire_names else str(dtype)
    return InvalidInput(f"input {quote(name)}: {template.format(type=type_name)}")
