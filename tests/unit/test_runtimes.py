"""The demo model's TensorFlow and PyTorch builds against each other and the numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpsserve.errors import ModelLoadError
from mpsserve.model.runtime import RuntimeOptions, load_runtime
from mpsserve.ops.demo import make_request, make_weights, reference
from tests.conftest import SEED, SMALL


@pytest.fixture(scope="module")
def request_2000() -> dict[str, np.ndarray]:
    req = make_request(SMALL, rows=2000, seed=11)
    req["history_lengths"][:3] = 0  # empty histories pool to zeros, not NaN
    req["history_values"] = req["history_values"][: int(req["history_lengths"].sum())]
    return req


def scores(kind: str, store: Path, req: dict[str, np.ndarray]) -> np.ndarray:
    runtime = load_runtime(kind, store / "1", RuntimeOptions(device="cpu"))
    return runtime.predict(req)["score"]


def test_tensorflow_and_torch_builds_agree(
    tf_store: Path, torch_store: Path, request_2000: dict[str, np.ndarray]
) -> None:
    tf_scores = scores("tensorflow", tf_store, request_2000)
    torch_scores = scores("torch", torch_store, request_2000)
    expected = reference(SMALL, make_weights(SMALL, SEED), request_2000)
    assert tf_scores.shape == torch_scores.shape == (2000,)
    assert np.abs(tf_scores - torch_scores).max() <= 1e-4
    assert np.abs(tf_scores - expected).max() <= 1e-4
    assert np.isfinite(tf_scores).all() and tf_scores.std() > 0.01  # not collapsed


@pytest.mark.parametrize("kind", ["tensorflow", "torch"])
def test_signature_is_read_with_ragged_pair_and_bounds(
    kind: str, tf_store: Path, torch_store: Path
) -> None:
    store = tf_store if kind == "tensorflow" else torch_store
    runtime = load_runtime(kind, store / "1", RuntimeOptions(device="cpu"))
    sig = runtime.signature
    assert sig.ragged_features == ("history",)
    assert {s.name for s in sig.inputs} == {"dense", "cat", "history_values", "history_lengths"}
    cat = sig.input("cat")
    assert cat is not None and cat.shape == (-1, 26) and cat.min_value == 0
    assert [(s.name, s.dtype) for s in sig.outputs] == [("score", "float32")]


def test_read_only_inputs_are_accepted_by_torch(
    torch_store: Path, request_2000: dict[str, np.ndarray]
) -> None:
    frozen = {k: v.copy() for k, v in request_2000.items()}
    for array in frozen.values():
        array.flags.writeable = False  # what zero-copy decoding of a request body yields
    assert scores("torch", torch_store, frozen).shape == (2000,)


@pytest.mark.parametrize("kind", ["tensorflow", "torch"])
def test_broken_model_directory_is_a_load_error(kind: str, tmp_path: Path) -> None:
    (tmp_path / "signature.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        load_runtime(kind, tmp_path, RuntimeOptions(device="cpu"))


def test_unknown_signature_name_lists_the_available_ones(tf_store: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no signature 'predict'.*serving_default"):
        load_runtime("tensorflow", tf_store / "1", RuntimeOptions(signature_name="predict"))
