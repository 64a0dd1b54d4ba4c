"""CUDA-graph bucketing: the padding keeps every real row's score (checked eagerly on CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mpsserve.model.runtime import RuntimeOptions, load_runtime
from mpsserve.model.runtime.graphs import ALIGN, GROWTH, GraphRunner, Padding, bucket
from mpsserve.ops.demo import make_request
from tests.conftest import SMALL


def test_buckets_cover_every_size_with_bounded_waste() -> None:
    sizes = [bucket(n) for n in range(1, 20_000)]
    assert all(s >= n and s % ALIGN == 0 for n, s in enumerate(sizes, start=1))
    assert all(s <= max(ALIGN, n * GROWTH + ALIGN) for n, s in enumerate(sizes, start=1))
    assert len(set(sizes)) < 60  # few distinct graphs for any traffic


@pytest.mark.parametrize("rows", [1, 37, 2000])
def test_padded_request_gives_the_same_scores(torch_store: Path, rows: int) -> None:
    runtime = load_runtime("torch", torch_store / "1", RuntimeOptions(device="cpu"))
    request = make_request(SMALL, rows=rows, seed=rows)
    padding = Padding(runtime.signature, request)
    assert padding.padded_rows > rows  # a spare row takes the padded history values
    padded = {}
    for spec in runtime.signature.inputs:
        array = request[spec.name]
        host = np.full(padding.padded_shape(spec.name, array.shape), 7, dtype=array.dtype)
        padding.stage(spec.name, array, host)  # every stale 7 is overwritten
        padded[spec.name] = host
    lengths, values = padded["history_lengths"], padded["history_values"]
    assert lengths.sum() == values.shape[0]  # the spare row owns exactly the padding
    got = runtime.predict(padded)["score"][:rows]
    want = runtime.predict(request)["score"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_graphs_stay_off_on_cpu(torch_store: Path) -> None:
    runtime = load_runtime("torch", torch_store / "1", RuntimeOptions(device="cpu"))
    runner = GraphRunner(None, runtime.signature, torch.device("cpu"))
    assert not runner.enabled
    assert runner.predict(make_request(SMALL, rows=4, seed=1), lambda _: {}) is None
