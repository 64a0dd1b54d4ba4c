"""Fixtures shared by every tier: small real demo models written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpsserve.ops.demo import DemoSpec, write_demo_model

#: The reference workload's shape with small tables, so models build and load in seconds.
SMALL = DemoSpec(table_rows=1000)
SEED = 7


@pytest.fixture(scope="session")
def tf_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding version 1 of the TensorFlow demo model."""
    store = tmp_path_factory.mktemp("tf-store")
    write_demo_model(store, "tensorflow", version=1, seed=SEED, spec=SMALL)
    return store


@pytest.fixture(scope="session")
def torch_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding version 1 of the PyTorch demo model, same seed."""
    pytest.importorskip("torch")
    store = tmp_path_factory.mktemp("torch-store")
    write_demo_model(store, "torch", version=1, seed=SEED, spec=SMALL)
    return store
