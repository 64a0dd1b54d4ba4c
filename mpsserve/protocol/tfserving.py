"""TensorFlow Serving REST predict codec, so TF-Serving clients work against us unchanged.

Spec: https://www.tensorflow.org/tfx/serving/api_rest ("Predict API"). Pure functions between
wire bytes and the transport-free types in ``mpsserve.types``; no HTTP framework, no Ray.

JSON carries no dtypes, so the caller passes the model's input dtypes (from its signature) and
values are converted as TF Serving converts them: JSON integers are fine for float inputs, but
integer inputs take only JSON integers (``2.0`` is refused, as TF Serving refuses it) and
booleans are not numbers. Ragged features travel as a ``<name>_values`` / ``<name>_lengths``
pair; in row format each instance carries its own ``<name>_values`` list. Every malformed
request raises ``InvalidInput`` naming the tensor and the problem.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mpsserve.errors import InferenceError, InvalidInput
from mpsserve.protocol.kserve import parse_json_object
from mpsserve.protocol.tensors import TFSERVING_JSON, json_array, json_cast
from mpsserve.text import quote
from mpsserve.types import (
    LENGTHS_SUFFIX,
    VALUES_SUFFIX,
    InferRequest,
    InferResponse,
    ragged_feature,
)

SIGNATURE = "serving_default"


def decode_predict(
    body: bytes, *, model: str, version: str | None, dtypes: dict[str, str]
) -> tuple[InferRequest, bool]:
    """Decode a predict body; returns the request and whether it used row ("instances") format."""
    doc = parse_json_object(body, non_finite=True)
    signature = doc.get("signature_name", SIGNATURE)
    if signature != SIGNATURE:
        raise InvalidInput(
            f'unknown signature_name {quote(str(signature))}; only "{SIGNATURE}" is served'
        )
    if ("instances" in doc) == ("inputs" in doc):
        raise InvalidInput('request must have exactly one of "instances" (rows) or "inputs"')
    if "instances" in doc:
        inputs = _decode_instances(doc["instances"], dtypes)
    else:
        inputs = _decode_columns(doc["inputs"], dtypes)
    return InferRequest(model=model, inputs=inputs, version=version), "instances" in doc


def _check_known(name: str, dtypes: dict[str, str]) -> None:
    """Refuse names the model does not have (and b64 objects, which look like a name)."""
    if name in dtypes:
        return
    if name == "b64":  # {"b64": ...} as a whole instance or as the whole "inputs"
        where = f'input "{next(iter(dtypes))}": ' if len(dtypes) == 1 else ""
        raise InvalidInput(f'{where}{{"b64": ...}} binary values are not supported')
    raise InvalidInput(f"unknown input {quote(name)}; the model's inputs are {sorted(dtypes)}")


def _single_input(dtypes: dict[str, str], what: str) -> str:
    """The only input's name, for the unnamed forms TF Serving allows single-input models."""
    if len(dtypes) != 1:
        raise InvalidInput(
            f"{what} must be a JSON object naming the inputs; the model has {len(dtypes)} "
            f"inputs {sorted(dtypes)}"
        )
    return next(iter(dtypes))


def _decode_columns(columns: Any, dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    """Columnar format: each named value is one whole tensor."""
    if not isinstance(columns, dict):
        columns = {_single_input(dtypes, '"inputs"'): columns}
    for name in columns:
        _check_known(name, dtypes)
    return {name: _to_tensor(name, value, dtypes[name]) for name, value in columns.items()}


def _decode_instances(instances: Any, dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    """Row format: stack each input's rows along a new first axis (ragged values concatenate)."""
    if not isinstance(instances, list) or not instances:
        raise InvalidInput('"instances" must be a non-empty list of rows')
    rows = _named_rows(instances, dtypes)
    ragged = [name for name in rows[0] if _is_ragged_values(name, dtypes)]
    partners = {name.removesuffix(VALUES_SUFFIX) + LENGTHS_SUFFIX for name in ragged}
    inputs: dict[str, np.ndarray] = {}
    for name in rows[0]:
        if name in ragged:
            inputs.update(_ragged(name, rows, dtypes))
        elif name not in partners:  # a given <base>_lengths is checked by _ragged
            inputs[name] = _stack(name, [row[name] for row in rows], dtypes[name])
    return inputs


def _named_rows(instances: list[Any], dtypes: dict[str, str]) -> list[dict[str, Any]]:
    """Every instance as {input: value}; all must name the same inputs as instance 0."""
    if not isinstance(instances[0], dict):
        name = _single_input(dtypes, "each instance")
        if any(isinstance(inst, dict) for inst in instances):
            raise InvalidInput(f"input {quote(name)}: mix of named and bare instances")
        return [{name: inst} for inst in instances]
    first = instances[0].keys()
    for index, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise InvalidInput(f"instance {index} is not a JSON object like instance 0")
        for name in inst:
            _check_known(name, dtypes)
        if inst.keys() != first:
            missing, extra = sorted(first - inst.keys()), sorted(inst.keys() - first)
            raise InvalidInput(
                f"instance {index} lacks inputs {missing} / has extra inputs {extra} "
                "compared with instance 0; every instance must name the same inputs"
            )
    return instances


def _is_ragged_values(name: str, dtypes: dict[str, str]) -> bool:
    """``<base>_values`` whose ``<base>_lengths`` partner is also a model input."""
    return ragged_feature(name, dtypes) is not None


def _ragged(name: str, rows: list[dict[str, Any]], dtypes: dict[str, str]) -> dict[str, Any]:
    """Concatenate per-row value lists; lengths from the lists, checked against given ones."""
    column = [row[name] for row in rows]
    for index, value in enumerate(column):
        if not isinstance(value, list):
            raise InvalidInput(f"input {quote(name)}: instance {index} must hold a list of values")
    values = _to_tensor(name, [item for value in column for item in value], dtypes[name])
    if values.ndim != 1:
        raise InvalidInput(f"input {quote(name)}: each instance must hold a flat list of values")
    lengths_name = name.removesuffix(VALUES_SUFFIX) + LENGTHS_SUFFIX
    lengths = np.array([len(value) for value in column], dtype=dtypes[lengths_name])
    if lengths_name in rows[0]:
        given = [row[lengths_name] for row in rows]
        _check_lengths(lengths_name, _stack(lengths_name, given, dtypes[lengths_name]), lengths)
    return {name: values, lengths_name: lengths}


def _check_lengths(name: str, given: np.ndarray, computed: np.ndarray) -> None:
    """Given ``<base>_lengths`` must be one scalar per instance equal to its list's length."""
    if given.shape != computed.shape:
        raise InvalidInput(f"input {quote(name)}: each instance must hold one scalar length")
    bad = np.flatnonzero(given != computed)
    if bad.size:
        i = bad[0]
        msg = f"instance {i} says {given[i]} but its values list has {computed[i]}"
        raise InvalidInput(f"input {quote(name)}: {msg}")


def _stack(name: str, column: list[Any], dtype: str) -> np.ndarray:
    """One tensor from the rows of a non-ragged input; on failure, names the row that is off."""
    try:
        return _to_tensor(name, column, dtype)
    except InvalidInput as exc:
        raise _bad_row(name, column) or exc from None


def _bad_row(name: str, column: list[Any]) -> InvalidInput | None:
    """The first row that is ragged or shaped unlike row 0 (None when all rows agree)."""
    shapes: list[tuple[int, ...]] = []
    for index, row in enumerate(column):
        try:
            shapes.append(np.shape(row))
        except ValueError:
            return InvalidInput(f"input {quote(name)}: instance {index} is a ragged nested list")
        if shapes[-1] != shapes[0]:
            return InvalidInput(
                f"input {quote(name)}: instance {index} has shape {list(shapes[-1])} but "
                f"instance 0 has {list(shapes[0])}; rows must have the same shape"
            )
    return None


def _to_tensor(name: str, value: Any, dtype_name: str) -> np.ndarray:
    """Convert a (nested) JSON value to the input's dtype, refusing lossy conversions."""
    dtype = np.dtype(dtype_name)
    arr = json_array(name, value, TFSERVING_JSON)
    if arr.dtype == object and _has_b64(value):
        raise InvalidInput(f'input {quote(name)}: {{"b64": ...}} binary values are not supported')
    return json_cast(name, arr, dtype, TFSERVING_JSON)


def _has_b64(value: Any) -> bool:
    """Whether a nested JSON value holds a ``{"b64": ...}`` object anywhere."""
    if isinstance(value, dict):
        return "b64" in value
    return isinstance(value, list) and any(_has_b64(item) for item in value)


def encode_predict(response: InferResponse, row_format: bool) -> bytes:
    """Encode outputs as ``{"predictions": rows}`` (row format) or ``{"outputs": ...}``."""
    outputs = {name: np.asarray(arr) for name, arr in response.outputs.items()}
    if not outputs:
        raise InferenceError("the model returned no outputs")
    for name, arr in outputs.items():
        if arr.dtype.kind not in "biuf":
            raise InferenceError(
                f"output {quote(name)}: dtype {arr.dtype} has no TF Serving JSON form"
            )
    if row_format:
        doc: dict[str, Any] = {"predictions": _rows(outputs)}
    elif len(outputs) == 1:
        doc = {"outputs": next(iter(outputs.values())).tolist()}
    else:
        doc = {"outputs": {name: arr.tolist() for name, arr in outputs.items()}}
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def _rows(outputs: dict[str, np.ndarray]) -> list[Any]:
    """One entry per row: the row's value, or {name: row value} for several outputs."""
    rows = {arr.shape[0] if arr.ndim else None for arr in outputs.values()}
    if len(rows) != 1 or None in rows:
        shapes = {name: list(arr.shape) for name, arr in outputs.items()}
        raise InferenceError(f"outputs do not share a batch dimension for row format: {shapes}")
    if len(outputs) == 1:
        return list(next(iter(outputs.values())).tolist())
    columns = {name: arr.tolist() for name, arr in outputs.items()}
    return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]


def encode_error(message: str) -> bytes:
    """TF Serving's error body ``{"error": message}``."""
    return json.dumps({"error": message}).encode("utf-8")


def model_status(versions: list[str], state: str = "AVAILABLE", error: str = "") -> dict[str, Any]:
    """The body of ``GET /v1/models/{name}``: one status entry per version."""
    status = {"error_code": "UNKNOWN" if error else "OK", "error_message": error}
    return {
        "model_version_status": [
            {"version": version, "state": state, "status": dict(status)} for version in versions
        ]
    }
