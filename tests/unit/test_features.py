from __future__ import annotations

import numpy as np
import pytest

from mpsserve.errors import InvalidInput, PayloadTooLarge
from mpsserve.model.features import prepare_inputs, synthetic_inputs
from mpsserve.ops.demo import make_request, signature
from tests.conftest import SMALL

SIG = signature(SMALL)


def request(rows: int = 50) -> dict[str, np.ndarray]:
    return make_request(SMALL, rows=rows, seed=3)


def test_good_request_passes_in_model_order() -> None:
    prepared = prepare_inputs(SIG, request(), max_rows=100)
    assert list(prepared) == ["dense", "cat", "history_values", "history_lengths"]


def test_safe_cast_is_accepted() -> None:
    req = request()
    req["history_lengths"] = req["history_lengths"].astype(np.int32)
    assert prepare_inputs(SIG, req, 100)["history_lengths"].dtype == np.int64


def broken(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    req = request()
    for name, value in changes.items():
        if value is None:
            del req[name]
        else:
            req[name] = value
    return req


def _negative_id() -> dict[str, np.ndarray]:
    req = request()
    req["cat"] = req["cat"].copy()
    req["cat"][4, 2] = -5
    return req


def _lengths_off_by_one() -> dict[str, np.ndarray]:
    req = request()
    req["history_lengths"] = req["history_lengths"].copy()
    req["history_lengths"][0] += 1
    return req


BAD = [
    ("unknown input", {**request(), "age": np.ones(50)}, "unknown input 'age'"),
    ("missing input", broken(dense=None), "missing input 'dense'"),
    ("wrong dtype", broken(dense=request()["dense"].astype(np.int64)), "'dense' has dtype int64"),
    ("unsafe cast", broken(cat=request()["cat"].astype(np.float64)), "'cat' has dtype float64"),
    ("shape", broken(dense=np.zeros((50, 12), np.float32)), "'dense' has shape [50, 12]"),
    ("rank", broken(history_values=np.zeros((3, 2), np.int64)), "'history_values' has shape"),
    ("rows", broken(cat=request()["cat"][:49]), "'cat' has 49 rows but 'dense' has 50"),
    ("lengths sum", _lengths_off_by_one(), "'history_lengths' adds up to"),
    ("id range", _negative_id(), "'cat' has value -5 at [4, 2], out of range [0, 2147483647]"),
    ("no rows", request(0), "request has no rows"),
]


@pytest.mark.parametrize(("case", "req", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_tensor(case: str, req: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        prepare_inputs(SIG, req, max_rows=100)
    assert message in info.value.message, case


def test_negative_length_is_reported_with_its_row() -> None:
    req = request()
    req["history_lengths"] = req["history_lengths"].copy()
    req["history_lengths"][[3, 4]] += [-100, 100]
    with pytest.raises(InvalidInput, match="negative length at row 3"):
        prepare_inputs(SIG, req, 100)


def test_too_many_rows() -> None:
    with pytest.raises(PayloadTooLarge, match="has 50 rows; this model accepts at most 10"):
        prepare_inputs(SIG, request(), max_rows=10)


def test_synthetic_inputs_pass_the_checks() -> None:
    prepared = prepare_inputs(SIG, synthetic_inputs(SIG, rows=16), max_rows=100)
    assert prepared["dense"].shape == (16, SMALL.n_dense)
