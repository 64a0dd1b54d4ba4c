"""Split models without a store: the manifest, the served signature, pooling, and the split
demo build scoring as the monolithic one through an in-memory row source (the real Redis
Cluster path is tests/integration/test_split_model.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mpsserve.embeddings.lookup import EmbeddingLookup
from mpsserve.embeddings.registry import TableInfo, VersionRecord
from mpsserve.errors import EmbeddingDataError, InvalidInput, ModelLoadError
from mpsserve.model.features import prepare_inputs
from mpsserve.model.runtime import RuntimeOptions, load_runtime
from mpsserve.model.split import MANIFEST_FILE, SplitManifest, SplitRuntime, pool_segments
from mpsserve.ops.demo import (
    demo_tables,
    make_request,
    make_weights,
    reference,
    signature,
    write_demo_model,
)
from tests.conftest import SEED, SMALL

TAG = "demo-s7"


class RowsInMemory:
    """The store's face (``RowSource``) over numpy tables, counting what it was asked."""

    def __init__(self, tables: Mapping[str, np.ndarray], version: str = TAG) -> None:
        self.tables = dict(tables)
        infos = {n: TableInfo(len(t), t.shape[1], 256) for n, t in tables.items()}
        self.record = VersionRecord(version, infos, state="complete")
        self.fetched: list[int] = []

    def require(self, version: str, dims: Mapping[str, int | None] | None = None) -> VersionRecord:
        return self.record

    def dims(self, version: str) -> dict[str, int]:
        return {name: table.shape[1] for name, table in self.tables.items()}

    def newest_descendant(self, version: str) -> str | None:
        return None  # no deltas here (tests/integration/test_split_model.py has them)

    def fetch(self, version: str, table: str, unique: np.ndarray) -> np.ndarray:
        assert version == self.record.version
        rows = self.tables[table]
        if len(unique) and (unique.min() < 0 or unique.max() >= len(rows)):
            raise EmbeddingDataError(f"ids not in table {table}")
        self.fetched.append(len(unique))
        return rows[unique]


@pytest.fixture(scope="module")
def split_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("split-store")
    write_demo_model(store, "tensorflow", version=1, seed=SEED, spec=SMALL, split=TAG)
    return store


def split_runtime(version_dir: Path, source: RowsInMemory) -> SplitRuntime:
    manifest = SplitManifest.read(version_dir)
    assert manifest is not None
    dnn = load_runtime("tensorflow", version_dir, RuntimeOptions(device="cpu"))
    return SplitRuntime(dnn, manifest, EmbeddingLookup(source, source.record, {}), "rec")


def test_split_demo_scores_as_the_monolithic_model(split_store: Path) -> None:
    source = RowsInMemory(demo_tables(SMALL, SEED))
    runtime = split_runtime(split_store / "1", source)
    # clients send what they send the monolithic model
    served = {s.name: s.to_dict() for s in runtime.signature.inputs}
    assert served == {s.name: s.to_dict() for s in signature(SMALL).inputs}
    assert runtime.signature.ragged_features == ("history",)
    weights = make_weights(SMALL, SEED)
    for seed, rows in ((1, 300), (2, 1), (3, 64)):
        request = make_request(SMALL, rows=rows, seed=seed)
        request["history_lengths"][: min(rows, 5)] = 0  # rows with no history: zeros
        request["history_values"] = request["history_values"][
            : int(request["history_lengths"].sum())
        ]
        prepared = prepare_inputs(runtime.signature, request, max_rows=10_000)
        got = runtime.predict(prepared)["score"]
        want = reference(SMALL, weights, request)
        assert got.shape == (rows,)
        assert np.max(np.abs(got - want)) <= 1e-4
    # each distinct id of a table fetched once per request
    request = make_request(SMALL, rows=50, seed=4)
    request["cat"][:] = 3  # one id in every column: 26 distinct table ids
    source.fetched.clear()
    runtime.predict(prepare_inputs(runtime.signature, request, max_rows=10_000))
    assert source.fetched[0] == SMALL.n_cat


def test_the_torch_split_build_scores_as_the_monolithic_model(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    version_dir = write_demo_model(tmp_path, "torch", 1, seed=SEED, spec=SMALL, split=TAG)
    manifest = SplitManifest.read(version_dir)
    assert manifest is not None
    source = RowsInMemory(demo_tables(SMALL, SEED))
    dnn = load_runtime("torch", version_dir, RuntimeOptions(device="cpu"))
    runtime = SplitRuntime(dnn, manifest, EmbeddingLookup(source, source.record, {}), "rec")
    request = make_request(SMALL, rows=200, seed=5)
    got = runtime.predict(prepare_inputs(runtime.signature, request, max_rows=1000))["score"]
    assert np.max(np.abs(got - reference(SMALL, make_weights(SMALL, SEED), request))) <= 1e-4


def test_ids_are_checked_before_a_lookup(split_store: Path) -> None:
    runtime = split_runtime(split_store / "1", RowsInMemory(demo_tables(SMALL, SEED)))
    request = make_request(SMALL, rows=4, seed=1)
    request["cat"] = request["cat"][:, :5]
    with pytest.raises(InvalidInput, match="'cat'"):
        prepare_inputs(runtime.signature, request, max_rows=100)
    request = make_request(SMALL, rows=4, seed=1)
    request["history_values"][0] = -1
    with pytest.raises(InvalidInput, match="history_values"):
        prepare_inputs(runtime.signature, request, max_rows=100)


def test_a_table_narrower_than_the_dnn_input_is_refused(split_store: Path) -> None:
    tables = demo_tables(SMALL, SEED)
    tables["history"] = tables["history"][:, :16]
    manifest = SplitManifest.read(split_store / "1")
    assert manifest is not None
    dnn = load_runtime("tensorflow", split_store / "1", RuntimeOptions(device="cpu"))

    class Tier:
        source = RowsInMemory(tables)

        def store(self) -> RowsInMemory:
            return self.source

        def lookup(self, version: str, dims: Mapping[str, int | None]) -> EmbeddingLookup:
            return EmbeddingLookup(self.source, self.source.record, {})

    with pytest.raises(ModelLoadError, match="table history has dim 16"):
        SplitRuntime.open(dnn, manifest, Tier(), "rec")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"embedding_version": "a:b"}, "embedding_version"),
        ({"features": []}, "features"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_broken_manifest_names_the_file_and_field(
    tmp_path: Path, change: dict[str, object], problem: str
) -> None:
    manifest = {"embedding_version": TAG, "features": [{"input": "x", "table": "t", "output": "o"}]}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({**manifest, **change}))
    with pytest.raises(ModelLoadError, match=rf"{MANIFEST_FILE} is not a valid .*{problem}"):
        SplitManifest.read(tmp_path)


def test_a_ragged_feature_cannot_concat(tmp_path: Path) -> None:
    feature = {"input": "h", "ragged": True, "table": "t", "output": "o", "combiner": "concat"}
    (tmp_path / MANIFEST_FILE).write_text(
        json.dumps({"embedding_version": TAG, "features": [feature]})
    )
    with pytest.raises(ModelLoadError, match="pools with sum or mean"):
        SplitManifest.read(tmp_path)


def test_pooling_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    lengths = np.array([0, 3, 1, 0, 5, 2], dtype=np.int64)
    values = rng.standard_normal((int(lengths.sum()), 4)).astype(np.float32)
    starts = np.cumsum(lengths) - lengths
    sums = np.stack([values[s : s + n].sum(axis=0) for s, n in zip(starts, lengths, strict=True)])
    np.testing.assert_allclose(pool_segments(values, lengths, mean=False), sums, atol=1e-6)
    means = sums / np.maximum(lengths, 1)[:, None]
    np.testing.assert_allclose(pool_segments(values, lengths, mean=True), means, atol=1e-6)
    assert not pool_segments(values, lengths, mean=True)[[0, 3]].any()


class TwoVersions:
    """A store double with a base and a delta of it, whose fetch of ``cat`` (the first
    feature) from the base waits at ``gate``: a swap then lands in the middle of a request."""

    def __init__(self, base: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> None:
        self.tables = {TAG: base, f"{TAG}.1": delta}
        infos = {n: TableInfo(len(t), t.shape[1], 256) for n, t in base.items()}
        self.records = {
            TAG: VersionRecord(TAG, infos, state="complete"),
            f"{TAG}.1": VersionRecord(f"{TAG}.1", infos, state="complete", base=TAG),
        }
        self.gate, self.waiting = threading.Event(), threading.Event()

    def require(self, version: str, dims: Mapping[str, int | None] | None = None) -> VersionRecord:
        return self.records[version]

    def dims(self, version: str) -> dict[str, int]:
        return {name: table.shape[1] for name, table in self.tables[version].items()}

    def fetch(self, version: str, table: str, unique: np.ndarray) -> np.ndarray:
        if version == TAG and table == "cat" and not self.gate.is_set():
            self.waiting.set()
            assert self.gate.wait(30)
        return self.tables[version][table][unique]

    def newest_descendant(self, version: str) -> str | None:
        return f"{TAG}.1"

    def chain(self, version: str) -> list[VersionRecord]:
        record = self.records[version]
        return [record] if record.base is None else [record, self.records[record.base]]

    def store(self) -> TwoVersions:  # the tier's face too
        return self

    def lookup(
        self, version: str, dims: Mapping[str, int | None], previous: object = None
    ) -> EmbeddingLookup:
        return EmbeddingLookup(self, self.records[version], {})


def test_a_request_in_flight_when_a_delta_arrives_uses_one_version(split_store: Path) -> None:
    base = demo_tables(SMALL, SEED)
    changed = {name: -table for name, table in base.items()}  # every row differs
    source = TwoVersions(base, changed)
    manifest = SplitManifest.read(split_store / "1")
    assert manifest is not None
    dnn = load_runtime("tensorflow", split_store / "1", RuntimeOptions(device="cpu"))
    runtime = SplitRuntime(dnn, manifest, source.lookup(TAG, {}), "rec", source)  # type: ignore[arg-type]
    request = make_request(SMALL, rows=100, seed=8)
    prepared = prepare_inputs(runtime.signature, request, max_rows=1000)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(runtime.predict, prepared)  # waits in cat's fetch
        assert source.waiting.wait(30)
        assert runtime.refresh() == f"{TAG}.1"  # the delta swaps in meanwhile
        source.gate.set()
        during = pending.result(timeout=60)["score"]
    weights = make_weights(SMALL, SEED)
    # history too came from the base, though the delta was served when it was looked up
    assert np.max(np.abs(during - reference(SMALL, weights, request))) <= 1e-4
    weights.cat_tables, weights.history_table = changed["cat"], changed["history"]
    after = runtime.predict(prepared)["score"]
    assert np.max(np.abs(after - reference(SMALL, weights, request))) <= 1e-4  # all delta
