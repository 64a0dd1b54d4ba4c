"""The torch runtime on the GPU computes the same scores as the numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpsserve.model.runtime import RuntimeOptions, load_runtime
from mpsserve.ops.demo import make_request, make_weights, reference
from tests.conftest import SEED, SMALL


def test_torch_runtime_on_gpu_matches_reference(torch_store: Path) -> None:
    runtime = load_runtime("torch", torch_store / "1", RuntimeOptions(device="auto"))
    assert runtime.device == "gpu"
    request = make_request(SMALL, rows=2000, seed=31)
    scores = runtime.predict(request)["score"]
    expected = reference(SMALL, make_weights(SMALL, SEED), request)
    assert np.abs(scores - expected).max() <= 1e-4


def test_out_of_range_ids_never_reach_the_gpu(torch_store: Path) -> None:
    """A bad id is refused before the model runs, so the CUDA context survives it."""
    from mpsserve.config import ModelConfig
    from mpsserve.errors import InvalidInput
    from mpsserve.model.servable import Servable

    servable = Servable(ModelConfig(name="rec", store=str(torch_store), runtime="torch"))
    servable.load()
    bad = make_request(SMALL, rows=16, seed=1)
    bad["cat"][0, 0] = -1
    with pytest.raises(InvalidInput, match="'cat' has value -1"):
        servable.infer(bad)
    good = servable.infer(make_request(SMALL, rows=16, seed=2))
    assert good[1]["score"].shape == (16,)


def test_cuda_graphs_replay_gives_the_reference_scores(torch_store: Path) -> None:
    """Graphs captured per padded bucket, checked against eager once, reused after."""
    from mpsserve.model.runtime.graphs import Padding
    from mpsserve.model.runtime.torch import TorchRuntime

    runtime = load_runtime("torch", torch_store / "1", RuntimeOptions(device="auto"))
    assert isinstance(runtime, TorchRuntime)
    graphs = runtime.graphs
    assert graphs is not None and graphs.enabled
    weights = make_weights(SMALL, SEED)
    keys = set()
    for rows, seed in [(2000, 1), (1999, 2), (2000, 3), (37, 4), (2000, 5)]:
        request = make_request(SMALL, rows=rows, seed=seed)
        keys.add(Padding(runtime.signature, request).key)
        scores = runtime.predict(request)["score"]
        assert scores.shape == (rows,)
        assert np.abs(scores - reference(SMALL, weights, request)).max() <= 1e-4
    assert graphs.enabled
    assert graphs.captures == len(keys) < 5
