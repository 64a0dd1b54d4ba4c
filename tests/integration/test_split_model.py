"""Split models against a real Redis Cluster on loopback (3 masters this test starts): the
split demo build scores as the monolithic one, the node cache answers repeated ids, a missing
embedding version stops a load with a clear error, a killed shard fails new ids fast while
cached ids are still served; and, served by ``mpsserve serve`` on a local Ray, a new model
version naming new embeddings swaps in under load without a failed request."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from mpsserve import metrics
from mpsserve.config import EmbeddingsConfig, ModelConfig
from mpsserve.embeddings.store import EmbeddingStore
from mpsserve.errors import EmbeddingDataError, EmbeddingStoreError
from mpsserve.model.servable import Servable
from mpsserve.ops.demo import (
    DemoWeights,
    make_request,
    make_weights,
    reference,
    write_demo_model,
)
from mpsserve.protocol.kserve import encode_json_request
from tests.conftest import SEED, SMALL
from tests.integration.conftest import PORT_OFFSET
from tests.processes import Load, Service, service_config, until
from tests.redis_cluster import Cluster, redis_cluster  # noqa: F401
from tests.unit.conftest import Recorder, recorder  # noqa: F401

TAG = "demo-s7"
HTTP_PORT = 28620 + PORT_OFFSET
#: A lookup against a dead shard must fail within this (generous for a loaded 2-core box).
FAIL_FAST_S = 10.0


def publish(store_dir: Path, config: Path, tag: str, *more: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mpsserve.ops.cli", "embeddings", "publish", "--config",
         str(config), "--model-dir", str(store_dir), "--version", tag, "--pin", *more],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def embeddings_section(cluster: Cluster, cache_dir: Path) -> dict[str, object]:
    return {
        "nodes": cluster.addresses,
        "connect_timeout_s": 1,
        "command_timeout_s": 2,
        "batch_rows": 5000,
        "node_cache_dir": str(cache_dir),
    }


def write_delta(path: Path, seed: int) -> DemoWeights:
    """An .npz of changed rows (every history row negated, 500 cat rows doubled) for the demo
    of ``seed``, and the weights with those changes: the delta's reference."""
    weights = make_weights(SMALL, seed)
    history_ids = np.arange(SMALL.table_rows, dtype=np.int64)
    cat_ids = np.random.default_rng(seed).choice(len(weights.cat_tables), 500, replace=False)
    weights.history_table = -weights.history_table
    weights.cat_tables = weights.cat_tables.copy()
    weights.cat_tables[cat_ids] *= 2
    np.savez(
        path,
        history=weights.history_table,
        history__ids=history_ids,
        cat=weights.cat_tables[cat_ids],
        cat__ids=cat_ids,
    )
    return weights


def ids_counts(backend: Recorder) -> dict[str, float]:
    metrics.flush_counts()
    totals: dict[str, float] = {}
    for value, tags in backend.of(metrics.EMBEDDING_IDS.name):
        totals[tags["level"]] = totals.get(tags["level"], 0) + value
    backend.values[:] = [v for v in backend.values if v[0] != metrics.EMBEDDING_IDS.name]
    return totals


def test_split_model_from_the_store_with_the_node_cache(
    redis_cluster: Cluster,  # noqa: F811
    tmp_path: Path,
    recorder: Recorder,  # noqa: F811
) -> None:
    store = tmp_path / "models"
    version_dir = write_demo_model(store, "tensorflow", 1, seed=SEED, spec=SMALL, split=TAG)
    section = embeddings_section(redis_cluster, tmp_path / "node-cache")
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "rec", "store": str(store)}],
                                      "embeddings": section}))  # fmt: skip
    # before the publish: the version names embeddings the store does not hold
    model = ModelConfig(name="rec", store=str(store), intra_op_threads=1)
    embeddings = EmbeddingsConfig.model_validate(section)
    early = Servable(model, device="cpu", embeddings=embeddings)
    early.poll()
    assert not early.ready and f"no embedding version '{TAG}'" in (early.problem() or "")
    print(publish(version_dir, config, TAG))

    served = Servable(model, device="cpu", embeddings=embeddings)
    served.load()
    weights = make_weights(SMALL, SEED)
    request = make_request(SMALL, rows=500, seed=11)
    worst = 0.0
    for seed in (11, 12):
        request = make_request(SMALL, rows=500, seed=seed)
        _, out = served.infer(request)
        worst = max(worst, float(np.max(np.abs(out["score"] - reference(SMALL, weights, request)))))
    print(f"split vs monolithic reference: max abs difference {worst:.2e}")
    assert worst <= 1e-4
    ids_counts(recorder)

    # the same request again: every distinct id from the node cache, none from the store
    served.infer(request)
    first = ids_counts(recorder)
    assert first["requested"] > 0 and first["node_cache"] == first["requested"]
    assert first.get("store", 0) == 0
    # another process's view (a second servable, its own mapping): hits too
    other = Servable(model, device="cpu", embeddings=embeddings)
    other.load()
    ids_counts(recorder)  # its warm-up's
    other.infer(request)
    second = ids_counts(recorder)
    assert second["node_cache"] == second["requested"] == first["requested"]
    [(seconds, _)] = recorder.of(metrics.EMBEDDING_LOOKUP_DURATION.name)[-1:]
    assert seconds > 0

    # a delta published on top: the next poll moves both servables to it, their node cache
    # starting as the base's less the changed rows
    changed = write_delta(tmp_path / "delta.npz", SEED)
    print(publish(tmp_path / "delta.npz", config, f"{TAG}.1", "--base", TAG))
    for servable in (served, other):
        servable.poll()
    ids_counts(recorder)
    _, out = served.infer(request)
    assert np.max(np.abs(out["score"] - reference(SMALL, changed, request))) <= 1e-4
    after = ids_counts(recorder)
    assert 0 < after["node_cache"] < after["requested"]  # warm, less the changed ids
    _, out = other.infer(request)
    assert np.max(np.abs(out["score"] - reference(SMALL, changed, request))) <= 1e-4
    print(f"after the delta: node cache {after['node_cache']:.0f} of {after['requested']:.0f}")
    with (
        EmbeddingStore.connect(embeddings) as client,
        pytest.raises(EmbeddingDataError, match=f"is the base of {TAG}.1"),
    ):
        client.delete(TAG, force=True)

    # both servables lease the delta and its base: gc keeps them even with --keep 0; the
    # others' leases go when they unload, and gc then takes the delta, then its base
    with EmbeddingStore.connect(embeddings) as client:
        leases = client.leases()
        assert set(leases) == {TAG, f"{TAG}.1"} and len(leases[f"{TAG}.1"]) == 2, leases
        assert client.collectable(keep=0) == []
        for servable in (early, other):
            servable.unload()
        assert len(client.leases()[f"{TAG}.1"]) == 1
        client.pin(TAG, pinned=False)
        client.pin(f"{TAG}.1", pinned=False)
        assert client.collectable(keep=0) == []  # served still serves them

    # a shard killed: cached ids still answer, new ids fail fast and clearly (503)
    redis_cluster.nodes[0].kill()
    _, out = served.infer(request)
    assert out["score"].shape == (500,)
    fresh = make_request(SMALL, rows=500, seed=99)
    started = time.monotonic()
    with pytest.raises(EmbeddingStoreError) as raised:
        served.infer(fresh)
    took = time.monotonic() - started
    print(f"lookup with a dead shard failed after {took:.2f}s: {raised.value.message}")
    assert took < FAIL_FAST_S and raised.value.http_status == 503
    errors = recorder.of(metrics.EMBEDDING_STORE_ERRORS.name)
    assert errors and errors[-1][1] == {"model": "rec"}
    served.unload()
    # the last user of the version's cache files removes them
    assert not [p for p in (tmp_path / "node-cache").rglob("*") if p.is_file()]


def test_new_embeddings_swap_in_under_load_without_a_failed_request(
    redis_cluster: Cluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    store = tmp_path / "models"
    first = write_demo_model(store / "rec", "tensorflow", 1, seed=SEED, spec=SMALL, split="s-1")
    config = service_config(store / "rec", HTTP_PORT, f"split{PORT_OFFSET}", max_rows=4000)
    config["models"][0]["poll_interval_s"] = 1
    config["embeddings"] = embeddings_section(redis_cluster, tmp_path / "node-cache")
    (tmp_path / "publish.yaml").write_text(yaml.safe_dump(config))
    publish(first, tmp_path / "publish.yaml", "s-1")
    request = make_request(SMALL, rows=200, seed=21)
    body = encode_json_request(request)
    with Service(tmp_path, config) as service:
        url = f"{service.url}/rec/infer"
        answer = requests.post(url, data=body, timeout=60).json()
        scores = np.array(answer["outputs"][0]["data"], dtype=np.float32)
        want = reference(SMALL, make_weights(SMALL, SEED), request)
        assert np.max(np.abs(scores - want)) <= 1e-4
        load = Load(url, body)
        load.start()
        try:
            time.sleep(2)
            # new embeddings and the DNN trained with them, published as version 2
            staging = tmp_path / "staging"
            second = write_demo_model(staging, "tensorflow", 2, seed=SEED + 1, spec=SMALL,
                                      split="s-2")  # fmt: skip
            publish(second, tmp_path / "publish.yaml", "s-2")
            second.rename(store / "rec" / "2")
            until(lambda: load.versions()[-1:] == ["2"], 120, "version 2 served")
            time.sleep(2)
        finally:
            load.stop.set()
            load.join(timeout=60)
        answer = requests.post(url, data=body, timeout=60).json()
        # a delta of s-2 under load: the replica moves to it without a restart
        changed = write_delta(tmp_path / "delta.npz", SEED + 1)
        delta_load = Load(url, body)
        delta_load.start()
        try:
            time.sleep(2)
            publish(tmp_path / "delta.npz", tmp_path / "publish.yaml", "s-2.1", "--base", "s-2")
            want_after = reference(SMALL, changed, request)
            until(lambda: _scores_near(url, body, want_after), 60, "the delta's scores")
            time.sleep(1)
        finally:
            delta_load.stop.set()
            delta_load.join(timeout=60)
        report = service.status()
        cli_text = service.cli("status").stdout
    failed = [o for o in load.outcomes if not o.ok]
    # stopped: the node cache's files are gone from the node (nothing left in its tmpfs)
    assert not list((tmp_path / "node-cache").rglob("*.rows")), service.output[-2000:]
    delta_failed = [o for o in delta_load.outcomes if not o.ok]
    print(f"{len(delta_load.outcomes)} requests while the delta was published, "
          f"{len(delta_failed)} failed")  # fmt: skip
    assert not delta_failed and delta_load.outcomes
    # status says which embedding version each replica serves, and its node cache
    assert report["models"]["rec"]["embeddings"] == {"s-2.1": 1}, report["models"]
    [replica] = [r for r in report["replicas"] if "error" not in r]
    assert replica["embeddings"]["version"] == "s-2.1"
    assert replica["embeddings"]["node_cache"]["cat"]["filled"] > 0
    assert "embedding versions: s-2.1 on 1 replica(s)" in cli_text, cli_text
    print(f"{len(load.outcomes)} requests during the swap, {len(failed)} failed, "
          f"versions {load.versions()}")  # fmt: skip
    assert not failed and load.versions() == ["1", "2"]
    scores = np.array(answer["outputs"][0]["data"], dtype=np.float32)
    want = reference(SMALL, make_weights(SMALL, SEED + 1), request)
    assert answer["model_version"] == "2" and np.max(np.abs(scores - want)) <= 1e-4


def _scores_near(url: str, body: bytes, want: np.ndarray) -> bool:
    answer = requests.post(url, data=body, timeout=60).json()
    scores = np.array(answer["outputs"][0]["data"], dtype=np.float32)
    return bool(np.max(np.abs(scores - want)) <= 1e-4)
