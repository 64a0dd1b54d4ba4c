"""Request tensors -> model inputs: every check a request must pass before a model sees it.

A bad request is rejected here with a message naming the tensor and the problem, so a model
(or a GPU: an out-of-range id can kill a CUDA context) never sees it. Ragged features arrive
as ``<name>_values`` + ``<name>_lengths``; their lengths must be non-negative and add up.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mpsserve.errors import InvalidInput, PayloadTooLarge
from mpsserve.model.runtime.base import Signature, TensorSpec
from mpsserve.protocol.tensors import numpy_to_datatype
from mpsserve.types import LENGTHS_SUFFIX, VALUES_SUFFIX


def prepare_inputs(
    signature: Signature, inputs: Mapping[str, np.ndarray], max_rows: int
) -> dict[str, np.ndarray]:
    """Check ``inputs`` against ``signature`` and return them in the model's order and dtypes."""
    _check_names(signature, inputs)
    prepared = {
        s.name: _check_tensor(s, inputs[s.name]) for s in signature.inputs if s.name in inputs
    }
    _check_missing(signature, prepared)
    rows = _check_rows(signature, prepared)
    if rows > max_rows:
        raise PayloadTooLarge(f"request has {rows} rows; this model accepts at most {max_rows}")
    for feature in signature.ragged_features:
        _check_ragged(feature, prepared)
    for spec in signature.inputs:
        _check_range(spec, prepared[spec.name])
    return prepared


def _check_names(signature: Signature, inputs: Mapping[str, np.ndarray]) -> None:
    expected = [spec.name for spec in signature.inputs]
    unknown = sorted(set(inputs) - set(expected))
    if unknown:
        raise InvalidInput(f"unknown input {unknown[0]!r}; the model takes {expected}")


def _check_missing(signature: Signature, inputs: Mapping[str, np.ndarray]) -> None:
    """After the tensors that were sent are checked, so their problems are reported first."""
    expected = [spec.name for spec in signature.inputs]
    missing = [name for name in expected if name not in inputs]
    if missing:
        raise InvalidInput(f"missing input {missing[0]!r}; the model takes {expected}")


def _dtype_mismatch(name: str, got: np.dtype, want: np.dtype) -> str:
    """Names the tensor and both types; strings (numpy's ``object``, which no client sent
    under that name) are named by their wire datatype, BYTES."""
    if got.kind in "OSU" or want.kind in "OSU":
        return (
            f"input {name!r} has datatype {_wire_name(got)}; the model expects {_wire_name(want)}"
        )
    return f"input {name!r} has dtype {got.name}; the model expects {want.name}"


def _wire_name(dtype: np.dtype) -> str:
    """``BYTES`` for strings, else the KServe datatype and the numpy name: ``INT64 (int64)``."""
    try:
        wire = numpy_to_datatype(dtype)
    except ValueError:
        return dtype.name
    return wire if wire == "BYTES" else f"{wire} ({dtype.name})"


def _check_tensor(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    want = np.dtype(spec.dtype)
    if array.dtype != want:
        if not np.can_cast(array.dtype, want, casting="safe"):
            raise InvalidInput(_dtype_mismatch(spec.name, array.dtype, want))
        array = array.astype(want)
    if array.ndim != len(spec.shape) or any(
        d != -1 and d != n for d, n in zip(spec.shape, array.shape, strict=True)
    ):
        raise InvalidInput(
            f"input {spec.name!r} has shape {list(array.shape)}; "
            f"the model expects {list(spec.shape)} (-1: any size)"
        )
    return array


def _batch_inputs(signature: Signature) -> list[TensorSpec]:
    """Inputs whose first dimension is the row count (ragged values are not)."""
    return [s for s in signature.inputs if s.shape and not s.name.endswith(VALUES_SUFFIX)] or [
        s for s in signature.inputs if s.shape
    ]


def _check_rows(signature: Signature, inputs: Mapping[str, np.ndarray]) -> int:
    batch = _batch_inputs(signature)
    if not batch:
        return 1
    first = batch[0].name
    rows = inputs[first].shape[0]
    for spec in batch[1:]:
        if not spec.ragged or spec.name.endswith(LENGTHS_SUFFIX):
            n = inputs[spec.name].shape[0]
            if n != rows:
                raise InvalidInput(
                    f"input {spec.name!r} has {n} rows but {first!r} has {rows}; "
                    "every input must have one entry per row"
                )
    if rows == 0:
        raise InvalidInput(f"request has no rows (input {first!r} is empty)")
    return rows


def _check_ragged(feature: str, inputs: Mapping[str, np.ndarray]) -> None:
    values, lengths = feature + VALUES_SUFFIX, feature + LENGTHS_SUFFIX
    row_lengths = inputs[lengths]
    if row_lengths.size and row_lengths.min() < 0:
        row = int(np.argmin(row_lengths))
        raise InvalidInput(f"input {lengths!r} has a negative length at row {row}")
    total, count = int(row_lengths.sum()), inputs[values].shape[0]
    if total != count:
        raise InvalidInput(
            f"input {lengths!r} adds up to {total} but {values!r} has {count} values; "
            "the lengths must add up to the number of values"
        )


def _check_range(spec: TensorSpec, array: np.ndarray) -> None:
    if array.size == 0 or (spec.min_value is None and spec.max_value is None):
        return
    low, high = array.min(), array.max()
    for bad, ok in (
        (low, spec.min_value is None or low >= spec.min_value),
        (high, spec.max_value is None or high <= spec.max_value),
    ):
        if not ok:
            where = np.unravel_index(int(np.argmax(array == bad)), array.shape)
            raise InvalidInput(
                f"input {spec.name!r} has value {bad} at {list(map(int, where))}, out of range "
                f"[{_fmt(spec.min_value, '-inf')}, {_fmt(spec.max_value, 'inf')}]"
            )


def _fmt(bound: float | None, unbounded: str) -> str:
    return unbounded if bound is None else f"{bound:g}" if isinstance(bound, float) else str(bound)


def synthetic_inputs(signature: Signature, rows: int = 8) -> dict[str, np.ndarray]:
    """A valid request built from the signature alone, for warm-up before serving: ``rows``
    rows, one value per row for each ragged feature."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in signature.inputs:
        shape = tuple(rows if d == -1 else d for d in spec.shape)
        if spec.ragged and spec.shape and spec.shape[0] == -1:
            shape = (rows,)
        shapes[spec.name] = shape
    return synthetic_like(signature, shapes)


def synthetic_like(
    signature: Signature, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """A valid request with the given input shapes (a ragged feature's values spread over
    its rows), for warming a new version with the shapes the old one served."""
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for spec in signature.inputs:
        shape = tuple(shapes[spec.name])
        if spec.ragged and spec.name.endswith(LENGTHS_SUFFIX):
            values = shapes[spec.name.removesuffix(LENGTHS_SUFFIX) + VALUES_SUFFIX][0]
            rows = shape[0]
            lengths = np.full(rows, values // rows if rows else 0, dtype=spec.dtype)
            lengths[: values - int(lengths.sum())] += 1
            out[spec.name] = lengths
            continue
        out[spec.name] = _random(spec, shape, rng)
    return out


def _random(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if dtype.kind in "iu":
        low = int(spec.min_value) if spec.min_value is not None else 0
        high = int(spec.max_value) if spec.max_value is not None else 100
        return rng.integers(low, high, shape, dtype=dtype, endpoint=True)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.standard_normal(shape).astype(dtype)
