"""KServe v2 / Open Inference Protocol REST codec: JSON tensors and the binary-tensor extension.

Pure functions between wire bytes and the transport-free types in ``mpsserve.types``; no HTTP
framework, no Ray, no model code. Tensors themselves (datatypes, raw bytes, JSON numbers) go
through the codec every protocol shares, ``protocol.tensors``; this module adds the v2 JSON
document around them.

Binary extension (Triton's ``binary_tensor_data``): when the HTTP header
``Inference-Header-Content-Length: N`` is present, the first N body bytes are the JSON header and
the rest is the raw data of every input that carries ``parameters.binary_data_size``, in input
order, little-endian and row-major. BYTES elements travel as a 4-byte little-endian length and
the bytes. Decoded binary tensors are views on the body (no copy; they may be read-only).

Every malformed request raises ``InvalidInput`` whose message names the tensor and the problem.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from mpsserve.errors import InferenceError, InvalidInput
from mpsserve.protocol.tensors import (
    DATATYPE_TO_NUMPY,
    KSERVE_JSON,
    check_shape,
    elements_as_bytes,
    json_array,
    json_cast,
    numpy_to_datatype,
    object_array,
    tensor_bytes,
    tensor_from_bytes,
)
from mpsserve.text import quote
from mpsserve.types import InferRequest, InferResponse, RequestedOutput

HEADER_LENGTH = "Inference-Header-Content-Length"


def decode_infer_request(
    body: bytes, *, model: str, version: str | None = None, header_length: int | None = None
) -> InferRequest:
    """Decode a v2 REST infer request body (JSON, optionally followed by binary tensors).

    ``header_length`` is the value of the ``Inference-Header-Content-Length`` header, or None
    when the whole body is JSON.
    """
    view = memoryview(body).cast("B")
    header, binary = _split_body(view, header_length)
    doc = parse_json_object(header)
    params = _get_dict(doc, "parameters", "request")
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidInput('request parameter "binary_data_output" must be a boolean')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput('request "id" must be a string')
    return InferRequest(
        model=model,
        inputs=_decode_inputs(doc.get("inputs"), binary),
        outputs=_decode_outputs(doc.get("outputs")),
        id=request_id,
        version=version,
        binary_output=binary_output,
        parameters=params,
    )


def _split_body(view: memoryview, header_length: int | None) -> tuple[bytes, memoryview]:
    """Separate the JSON header from the binary tail without copying the tail."""
    if header_length is None:
        return view.tobytes(), view[len(view) :]
    if header_length < 0:
        raise InvalidInput(f"{HEADER_LENGTH} is negative ({header_length})")
    if header_length > len(view):
        raise InvalidInput(
            f"{HEADER_LENGTH} ({header_length}) is larger than the body ({len(view)} bytes)"
        )
    return view[:header_length].tobytes(), view[header_length:]


def parse_json_object(header: bytes, non_finite: bool = False) -> dict[str, Any]:
    """Parse a JSON object (a request body or header), every parser failure an InvalidInput.

    ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (RFC 8259) and are refused unless
    ``non_finite`` (TF Serving's REST API takes them; Python's parser would by default). An
    integer of more than 4300 digits (Python's conversion limit) is refused naming where it
    is; the hooks that find it run only then, so good requests parse at full speed."""
    hooks: dict[str, Any] = {} if non_finite else {"parse_constant": _refuse_constant}
    try:
        doc = json.loads(header, **hooks)
    except json.JSONDecodeError as exc:
        msg = f"request body is not valid JSON at position {exc.pos}: {exc.msg}"
        raise InvalidInput(msg) from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"request body is not valid UTF-8 at position {exc.start}") from None
    except RecursionError:
        raise InvalidInput("request body JSON is nested too deeply") from None
    except _NonFinite:
        where = _locate(header, {"parse_constant": _mark_constant})
        raise InvalidInput(
            f"request body holds NaN or Infinity{where}, which JSON does not have; send such "
            "values as binary tensor data"
        ) from None
    except ValueError:  # int() refused a number too long to convert
        where = _locate(header, {"parse_int": _mark_long_int, "parse_constant": float})
        raise InvalidInput(
            f"request body holds an integer with more digits than any tensor can hold{where}"
        ) from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    return doc


class _NonFinite(Exception):
    pass


_MARK = object()  # stands for the offending number when locating it
_LONG_INT_DIGITS = 4000


def _refuse_constant(_token: str) -> Any:
    raise _NonFinite


def _mark_constant(_token: str) -> Any:
    return _MARK


def _mark_long_int(digits: str) -> Any:
    return _MARK if len(digits) > _LONG_INT_DIGITS else int(digits)


def _locate(header: bytes, hooks: dict[str, Any]) -> str:
    """`` at <path>`` of the first number a hook marked (only on the error path)."""
    try:
        path = _path_to(json.loads(header, **hooks), "")
    except (ValueError, RecursionError):
        return ""
    return f" at {path}" if path else ""


def _path_to(node: Any, path: str) -> str | None:
    """Where ``_MARK`` is, as ``inputs["dense"].data[3]``: list entries that are named
    objects (v2 inputs) are shown by name, quoted and truncated."""
    if node is _MARK:
        return path or "(top level)"
    if isinstance(node, dict):
        items = ((f"{path}.{quote(str(k))}" if path else quote(str(k)), v) for k, v in node.items())
    elif isinstance(node, list):
        items = ((f"{path}[{_label(i, v)}]", v) for i, v in enumerate(node))
    else:
        return None
    for sub, value in items:
        found = _path_to(value, sub)
        if found is not None:
            return found
    return None


def _label(index: int, entry: Any) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return quote(name) if isinstance(name, str) else str(index)


def _get_dict(entry: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    """Optional JSON object member ``key`` (``{}`` when absent); InvalidInput if not an object."""
    value = entry.get(key, {})
    if not isinstance(value, dict):
        raise InvalidInput(f'{what} "{key}" must be a JSON object')
    return value


def _decode_inputs(entries: Any, binary: memoryview) -> dict[str, np.ndarray]:
    """Decode the "inputs" list, consuming the binary tail in input order."""
    if not isinstance(entries, list):
        raise InvalidInput('request "inputs" is missing or not a list')
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, entry in enumerate(entries):
        name = _entry_name(entry, f"inputs[{index}]")
        if name in inputs:
            raise InvalidInput(f"duplicate input name {quote(name)}")
        inputs[name], offset = _decode_input(name, entry, binary, offset)
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary)} bytes follow the JSON header but the inputs' binary_data_size "
            f"add up to {offset}"
        )
    return inputs


def _entry_name(entry: Any, where: str) -> str:
    """The non-empty "name" of an inputs/outputs entry."""
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f'{where} has no "name" (a non-empty string)')
    return name


def _decode_input(
    name: str, entry: dict[str, Any], binary: memoryview, offset: int
) -> tuple[np.ndarray, int]:
    """Decode one input; returns the tensor and the binary offset after it."""
    datatype = entry.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPE_TO_NUMPY:
        raise InvalidInput(f"unknown datatype {quote(str(datatype))} for input {quote(name)}")
    shape = check_shape(name, entry.get("shape"))
    params = _get_dict(entry, "parameters", f"input {quote(name)}")
    if "shared_memory_region" in params:
        raise InvalidInput(f"input {quote(name)}: shared memory is not supported")
    size = params.get("binary_data_size")
    has_data = "data" in entry
    if size is not None and has_data:
        raise InvalidInput(f'input {quote(name)} has both "data" and parameters.binary_data_size')
    if size is None:
        if not has_data:
            raise InvalidInput(f'input {quote(name)} has neither "data" nor binary_data_size')
        return _from_json(name, datatype, shape, entry["data"]), offset
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"input {quote(name)}: binary_data_size must be a non-negative integer")
    end = offset + size
    if end > len(binary):
        raise InvalidInput(
            f"input {quote(name)}: binary data ends at byte {end} after the JSON header but only "
            f"{len(binary)} bytes follow it (is {HEADER_LENGTH} set?)"
        )
    return tensor_from_bytes(name, datatype, shape, binary[offset:end], "binary_data_size"), end


def _from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    """Convert flat or nested JSON "data" (row-major) to a tensor of ``shape``."""
    if not isinstance(data, list):
        raise InvalidInput(f'input {quote(name)}: "data" must be a list')
    if datatype == "BYTES":
        return _json_bytes(name, shape, data)
    arr = json_array(name, data, KSERVE_JSON)
    _check_count(name, shape, arr.size)
    return json_cast(name, arr, DATATYPE_TO_NUMPY[datatype], KSERVE_JSON).reshape(shape)


def _json_bytes(name: str, shape: list[int], data: list[Any]) -> np.ndarray:
    """JSON BYTES elements are strings; they become UTF-8 ``bytes`` like binary BYTES."""
    flat = list(_flatten(data))
    _check_count(name, shape, len(flat))
    if not all(isinstance(item, str) for item in flat):
        raise InvalidInput(f'input {quote(name)}: BYTES "data" must hold only strings')
    return object_array([item.encode("utf-8") for item in flat]).reshape(shape)


def _flatten(data: list[Any]) -> Any:
    """Yield the leaves of a nested list in row-major order."""
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def _check_count(name: str, shape: list[int], got: int) -> None:
    """The element count of "data" must equal the product of "shape"."""
    expected = math.prod(shape)
    if got != expected:
        raise InvalidInput(
            f'input {quote(name)}: shape {shape} needs {expected} elements, "data" has {got}'
        )


def _decode_outputs(entries: Any) -> list[RequestedOutput] | None:
    """Decode the optional "outputs" list (None: the model's every output)."""
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise InvalidInput('request "outputs" must be a list')
    outputs: list[RequestedOutput] = []
    for index, entry in enumerate(entries):
        name = _entry_name(entry, f"outputs[{index}]")
        if any(o.name == name for o in outputs):
            raise InvalidInput(f"duplicate output name {quote(name)}")
        binary = _get_dict(entry, "parameters", f"output {quote(name)}").get("binary_data", False)
        if not isinstance(binary, bool):
            raise InvalidInput(f'output {quote(name)}: parameter "binary_data" must be a boolean')
        outputs.append(RequestedOutput(name=name, binary=binary))
    return outputs


def encode_infer_response(
    response: InferResponse, request: InferRequest
) -> tuple[bytes, dict[str, str]]:
    """Encode a response as (body, headers); outputs the request wants binary follow the JSON."""
    entries: list[dict[str, Any]] = []
    chunks: list[Any] = []
    for name, arr in response.outputs.items():
        entry, chunk = _encode_output(name, np.asarray(arr), request.wants_binary(name))
        entries.append(entry)
        if chunk is not None:
            chunks.append(chunk)
    doc: dict[str, Any] = {"model_name": response.model, "model_version": response.version}
    if response.id is not None:
        doc["id"] = response.id
    doc["outputs"] = entries
    header = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return header, {"Content-Type": "application/json"}
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    return b"".join([header, *chunks]), headers


def encode_json_request(inputs: dict[str, np.ndarray]) -> bytes:
    """A whole-JSON v2 request (for curl and examples; clients that care send binary)."""
    entries = [
        _encode_output(name, np.asarray(arr), binary=False)[0] for name, arr in inputs.items()
    ]
    return json.dumps({"inputs": entries}, separators=(",", ":")).encode("utf-8")


def _encode_output(name: str, arr: np.ndarray, binary: bool) -> tuple[dict[str, Any], Any]:
    """JSON entry for one output, plus its raw bytes (a buffer) when it travels binary."""
    try:
        datatype = numpy_to_datatype(arr.dtype)
    except ValueError as exc:
        raise InferenceError(f"output {quote(name)}: {exc}") from exc
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
    if not binary:
        entry["data"] = _json_bytes_data(name, arr) if datatype == "BYTES" else arr.ravel().tolist()
        return entry, None
    raw = tensor_bytes(name, arr, datatype)
    entry["parameters"] = {"binary_data_size": len(raw)}
    return entry, raw


def _json_bytes_data(name: str, arr: np.ndarray) -> list[str]:
    """BYTES as JSON strings; bytes that are not UTF-8 can only travel binary."""
    try:
        return [item.decode("utf-8") for item in elements_as_bytes(name, arr)]
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"output {quote(name)} holds bytes that are not valid UTF-8; request it with "
            '"binary_data": true'
        ) from exc


def encode_error(message: str) -> bytes:
    """The v2 error body ``{"error": message}``."""
    return json.dumps({"error": message}).encode("utf-8")
