"""The embedding store against a real Redis Cluster on loopback (3 masters, redis-server
processes this test starts; no Ray): publish the demo's tables through the CLI, look rows up
exactly, list, pin, delete, a half-published version never used, credentials, and a shard
killed under lookups failing fast and clearly."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from mpsserve.config import EmbeddingsConfig
from mpsserve.embeddings.layout import Layout
from mpsserve.embeddings.probe import probe
from mpsserve.embeddings.store import EmbeddingStore, Table
from mpsserve.errors import (
    EmbeddingDataError,
    EmbeddingStoreError,
    EmbeddingVersionMissing,
)
from mpsserve.ops import cli
from mpsserve.ops.demo import demo_tables
from mpsserve.ops.status import with_store
from tests.conftest import SEED, SMALL
from tests.redis_cluster import Cluster, redis_cluster, running_cluster  # noqa: F401

#: A lookup against a dead shard must fail within this (it takes ~0.05 s; a hang would
#: take the client's timeouts times its retries and more). Generous for a loaded 2-core box.
FAIL_FAST_S = 10.0


def store_config(cluster: Cluster, **extra: object) -> EmbeddingsConfig:
    return EmbeddingsConfig(
        nodes=cluster.addresses, connect_timeout_s=1, command_timeout_s=2, **extra
    )


def config_file(tmp_path: Path, cluster: Cluster, **extra: object) -> str:
    section = {"nodes": cluster.addresses, "batch_rows": 5000, **extra}
    data = {"models": [{"name": "rec", "store": str(tmp_path)}], "embeddings": section}
    (tmp_path / "service.yaml").write_text(yaml.safe_dump(data))
    return str(tmp_path / "service.yaml")


@pytest.fixture
def store(redis_cluster: Cluster) -> Iterator[EmbeddingStore]:  # noqa: F811
    with EmbeddingStore.connect(store_config(redis_cluster)) as client:
        yield client


def row_keys(cluster: Cluster, prefix: str = "mpsserve") -> int:
    """Row hashes on every master (SCAN per node), to see what a delete left behind."""
    count = 0
    for address in cluster.addresses:
        host, port = address.split(":")
        with redis.Redis(host=host, port=int(port), password=cluster.password) as node:
            count += sum(1 for _ in node.scan_iter(match=f"{prefix}:rows:*", count=1000))
    return count


def test_publish_the_demo_tables_and_look_them_up_exactly(
    tf_store: Path,
    tmp_path: Path,
    redis_cluster: Cluster,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = config_file(tmp_path, redis_cluster)
    assert cli.main(["embeddings", "publish", "--config", config, "--model-dir",
                     str(tf_store / "1"), "--version", "v1", "--pin"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = SMALL.n_cat * SMALL.table_rows + SMALL.table_rows
    assert f"publishing 2 table(s), {rows} rows" in out
    assert "  cat: 26000/26000 rows (100%)" in out and "rows/s" in out  # progress lines
    assert f"published version v1: {rows} rows" in out and "complete, pinned" in out

    assert cli.main(["embeddings", "list", "--config", config, "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["version"] == "v1" and listed["state"] == "complete" and listed["pinned"]
    assert listed["tables"]["cat"] == {"rows": 26000, "dim": SMALL.dim, "buckets": 256}

    source = demo_tables(SMALL, SEED)
    rng = np.random.default_rng(3)
    with EmbeddingStore.connect(store_config(redis_cluster)) as store:
        for table, rows_of in source.items():
            ids = rng.integers(0, len(rows_of), 3000)
            ids[1000:1500] = ids[0]  # duplicates: fetched once, returned everywhere
            found = store.lookup("v1", table, ids)
            assert found.dtype == np.float32 and np.array_equal(found, rows_of[ids]), table
        ragged = rng.integers(0, 26000, (40, 26))  # any shape: [*ids.shape, dim]
        assert np.array_equal(store.lookup("v1", "cat", ragged), source["cat"][ragged])
        assert store.lookup("v1", "cat", np.array([], dtype=np.int64)).shape == (0, SMALL.dim)
        with pytest.raises(EmbeddingDataError, match=r"1 id\(s\) not in table history"):
            store.lookup("v1", "history", np.array([5, SMALL.table_rows]))
        with pytest.raises(EmbeddingDataError, match="has dim 32, expected 16"):
            store.require("v1", {"cat": 16})
        with pytest.raises(EmbeddingVersionMissing, match="no embedding version 'v9'"):
            store.lookup("v9", "cat", np.array([1]))


def test_publish_an_npz_with_its_own_ids(
    tmp_path: Path,
    redis_cluster: Cluster,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = np.random.default_rng(4)
    users = rng.standard_normal((500, 12), dtype=np.float32)
    user_ids = rng.choice(2**40, 500, replace=False) - 2**39  # sparse, some negative
    items = rng.standard_normal((300, 4), dtype=np.float32)
    np.savez(tmp_path / "embeddings.npz", users=users, users__ids=user_ids, items=items)
    config = config_file(tmp_path, redis_cluster)
    assert cli.main(["embeddings", "publish", "--config", config, "--model-dir",
                     str(tmp_path), "--version", "npz-1", "--buckets", "64"]) == 0  # fmt: skip
    assert "published version npz-1: 800 rows" in capsys.readouterr().out
    with EmbeddingStore.connect(store_config(redis_cluster)) as store:
        assert store.require("npz-1", {"users": 12, "items": 4}).tables["users"].buckets == 64
        order = rng.permutation(500)
        assert np.array_equal(store.lookup("npz-1", "users", user_ids[order]), users[order])
        assert np.array_equal(store.lookup("npz-1", "items", np.arange(300)), items)
    assert cli.main(["embeddings", "publish", "--config", config, "--model-dir",
                     str(tmp_path / "nothing"), "--version", "x"]) == 2  # fmt: skip
    assert "no embedding tables" in capsys.readouterr().err


def test_list_pin_and_delete(
    store: EmbeddingStore,
    tmp_path: Path,
    redis_cluster: Cluster,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = np.random.default_rng(0).standard_normal((5000, 8), dtype=np.float32)
    for version in ("old", "new"):
        store.publish(version, {"t": Table(rows)})
    store.pin("new")
    config = config_file(tmp_path, redis_cluster)
    assert cli.main(["embeddings", "list", "--config", config]) == 0
    table = capsys.readouterr().out
    assert "old" in table and "new" in table and "t 5000x8" in table
    assert cli.main(["embeddings", "delete", "--config", config, "--version", "new"]) == 2
    assert "is pinned (in use); unpin it or pass --force" in capsys.readouterr().err

    assert cli.main(["embeddings", "delete", "--config", config, "--version", "old"]) == 0
    assert "deleted embedding version old (256 row hashes)" in capsys.readouterr().out
    assert [r.version for r in store.versions()] == ["new"]
    assert row_keys(redis_cluster) == 256  # only new's left
    with pytest.raises(EmbeddingVersionMissing):
        store.lookup("old", "t", np.array([1]))

    assert cli.main(["embeddings", "delete", "--config", config, "--version", "new",
                     "--force"]) == 0  # fmt: skip
    assert row_keys(redis_cluster) == 0 and store.versions() == [] and store.pins() == set()


class Interrupted(Exception):
    pass


def test_a_half_published_version_is_never_used_and_can_be_resumed(
    store: EmbeddingStore,
    redis_cluster: Cluster,  # noqa: F811
) -> None:
    rows = np.random.default_rng(1).standard_normal((20000, 16), dtype=np.float32)

    def stop_after_first_batch(table: str, done: int, total: int) -> None:
        if done > 0:
            raise Interrupted  # as a publisher that dies half way

    small_batches = store_config(redis_cluster, batch_rows=4000)
    with EmbeddingStore.connect(small_batches) as publisher, pytest.raises(Interrupted):
        publisher.publish("v2", {"t": Table(rows)}, stop_after_first_batch)
    (record,) = store.versions()
    assert record.state == "publishing" and not record.complete
    with pytest.raises(EmbeddingVersionMissing, match="'v2' is publishing, not complete"):
        store.lookup("v2", "t", np.array([0]))  # its first rows are there, yet unused
    assert "unfinished: ['v2 (publishing)']" in probe(store.config).detail

    done = store.publish("v2", {"t": Table(rows)})  # the same again: resumed
    assert done.complete
    ids = np.arange(0, 20000, 7)
    assert np.array_equal(store.lookup("v2", "t", ids), rows[ids])
    with pytest.raises(EmbeddingDataError, match="already exists"):
        store.publish("v2", {"t": Table(rows)})


def test_credentials_come_from_the_config_and_never_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_cluster(tmp_path / "redis", password="correct-horse-battery") as cluster:
        monkeypatch.setenv("MPSSERVE_TEST_REDIS_PW", "correct-horse-battery")
        good = store_config(cluster, password_env="MPSSERVE_TEST_REDIS_PW")
        with EmbeddingStore.connect(good) as store:
            store.publish("v1", {"t": Table(np.ones((10, 4), dtype=np.float32))})
            assert store.lookup("v1", "t", np.array([3])).tolist() == [[1.0] * 4]
        monkeypatch.setenv("MPSSERVE_TEST_REDIS_PW", "wrong-password-xyz")
        with pytest.raises(EmbeddingStoreError) as refused:
            EmbeddingStore.connect(good)
        assert "wrong-password-xyz" not in refused.value.message
        assert "refused the credentials" in refused.value.message
        found = probe(store_config(cluster))  # no password at all
        assert not found.ok and "refused the credentials" in found.detail
        assert "correct-horse" not in json.dumps(found.to_dict())


def test_a_killed_master_with_a_replica_fails_over_and_lookups_recover(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "redis", replicas=1) as cluster:
        rows = np.random.default_rng(5).standard_normal((30000, 8), dtype=np.float32)
        ids = np.arange(0, 30000, 13)
        with EmbeddingStore.connect(store_config(cluster)) as store:
            store.publish("v1", {"t": Table(rows)})
            store.require("v1")  # the record read now: the registry's shard may be the victim
            cluster.wait_replicated()
            cluster.nodes[1].kill()  # a master: the first `masters` nodes are
            outcomes = _until_a_lookup_succeeds(store, ids, within_s=60)
            assert np.array_equal(store.lookup("v1", "t", ids), rows[ids])  # nothing lost
        assert outcomes, "the first lookup after the kill cannot have succeeded"
        assert max(outcomes) < FAIL_FAST_S  # each failed lookup failed fast, none hung


def _until_a_lookup_succeeds(
    store: EmbeddingStore, ids: np.ndarray, within_s: float
) -> list[float]:
    """Look up every 0.2 s until one succeeds; the seconds each failed one took."""
    failed: list[float] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            store.lookup("v1", "t", ids)
            return failed
        except EmbeddingStoreError:
            failed.append(time.monotonic() - started)
            time.sleep(0.2)
    raise AssertionError(f"no failover within {within_s}s ({len(failed)} lookups failed)")


def test_a_killed_master_fails_lookups_fast_and_clearly(
    store: EmbeddingStore,
    redis_cluster: Cluster,  # noqa: F811
) -> None:
    rows = np.random.default_rng(2).standard_normal((30000, 8), dtype=np.float32)
    store.publish("v1", {"t": Table(rows)})
    ids = np.arange(0, 30000, 11)
    assert np.array_equal(store.lookup("v1", "t", ids), rows[ids])
    registry_slot_owner = _owner_of(redis_cluster, Layout("mpsserve").versions_key)
    victim = next(n for n in redis_cluster.nodes if n.address != registry_slot_owner)
    victim.kill()

    started = time.monotonic()
    with pytest.raises(EmbeddingStoreError) as failed:
        store.lookup("v1", "t", ids)  # its buckets spread over every shard
    assert time.monotonic() - started < FAIL_FAST_S
    assert f"looking up {len(ids)} ids in t failed" in failed.value.message
    assert victim.address in failed.value.message  # names the shard that is gone

    found = probe(store.config)
    assert not found.ok and f"'{victim.address}': 'unreachable'" in found.detail
    report = with_store({"ok": True, "verdict": "OK: 1 model replica(s) answer"}, store.config)
    assert not report["ok"]
    assert report["verdict"].startswith("PROBLEM: embedding store: 3 node(s), cluster_state NOT")
    assert report["verdict"].endswith("; 1 model replica(s) answer")

    # The survivors mark the cluster down once the node timeout passes: still a fast error.
    deadline = time.monotonic() + 30
    while "fail" not in json.dumps(probe(store.config).nodes) and time.monotonic() < deadline:
        time.sleep(0.5)
    started = time.monotonic()
    with pytest.raises(EmbeddingStoreError):
        store.lookup("v1", "t", ids)
    assert time.monotonic() - started < FAIL_FAST_S


def _owner_of(cluster: Cluster, key: str) -> str:
    host, port = cluster.addresses[0].split(":")
    with redis.Redis(host=host, port=int(port)) as node:
        slot = node.execute_command("CLUSTER KEYSLOT", key)
        for start, end, (owner_host, owner_port, *_), *_ in node.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                host = owner_host.decode() if isinstance(owner_host, bytes) else owner_host
                return f"{host}:{owner_port}"
    raise AssertionError(f"no owner of slot {slot}")


def test_a_healthy_store_in_doctor_and_status(
    store: EmbeddingStore,
    tmp_path: Path,
    redis_cluster: Cluster,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mpsserve.node import doctor
    from mpsserve.node.gpu import Inventory

    store.publish("v1", {"t": Table(np.zeros((10, 2), dtype=np.float32))})
    report = with_store({"ok": True, "verdict": "OK: fine"}, store.config)
    assert report["ok"] and report["verdict"] == "OK: fine"
    assert (
        report["embeddings"]["ok"]
        and "1 complete version(s) ['v1']" in (report["embeddings"]["detail"])
    )
    assert len(report["embeddings"]["nodes"]) == 3

    monkeypatch.setattr(doctor, "inventory", lambda: Inventory(error="no driver"))
    config = config_file(tmp_path, redis_cluster)
    assert cli.main(["doctor", "--config", config]) == 0  # mps auto, no GPU: not judged
    out = capsys.readouterr().out
    assert "[  ok] embedding store: 3 node(s), cluster_state ok; 1 complete version(s)" in out
    assert "[  ok] embedding node cache: /dev/shm/mpsserve-embeddings/mpsserve-" in out
    assert "the largest version needs 0 MiB" in out


def test_a_delta_patches_its_base_down_the_chain(
    store: EmbeddingStore,
) -> None:
    rng = np.random.default_rng(9)
    users = rng.standard_normal((400, 6), dtype=np.float32)
    items = rng.standard_normal((100, 6), dtype=np.float32)
    store.publish("full", {"users": Table(users), "items": Table(items)})
    first = users.copy()
    first[:10] += 1
    store.publish("full.1", {"users": Table(first[:10], np.arange(10))}, base="full")
    second = first.copy()
    second[[5, 300]] -= 3
    store.publish("full.2", {"users": Table(second[[5, 300]], np.array([5, 300]))}, base="full.1")
    every = rng.permutation(400)
    assert np.array_equal(store.lookup("full.2", "users", every), second[every])
    assert np.array_equal(store.lookup("full.1", "users", every), first[every])
    assert np.array_equal(store.lookup("full.2", "items", np.arange(100)), items)  # base's
    assert sorted(store.changed_ids("full.2", "users").tolist()) == [5, 300]
    assert len(store.changed_ids("full.2", "items")) == 0
    assert store.newest_descendant("full") == "full.2"
    assert store.newest_descendant("full.2") is None
    assert store.require("full.2", {"users": 6, "items": 6}).base == "full.1"
    with pytest.raises(EmbeddingDataError, match="not in base"):
        store.publish("bad", {"other": Table(users)}, base="full")
    with pytest.raises(EmbeddingDataError, match="has dim 3, its base 6"):
        store.publish("bad", {"users": Table(users[:, :3])}, base="full")
    with pytest.raises(EmbeddingVersionMissing, match="no embedding version 'nope'"):
        store.publish("bad", {"users": Table(users)}, base="nope")
    with pytest.raises(EmbeddingDataError, match=r"'full\.1' is the base of full\.2"):
        store.delete("full.1")
    store.delete("full.2")
    store.delete("full.1")
    store.delete("full")


def test_gc_keeps_the_newest_the_pinned_the_leased_and_their_bases(
    store: EmbeddingStore,
    tmp_path: Path,
    redis_cluster: Cluster,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = np.ones((10, 2), dtype=np.float32)
    for tag in ("a", "b", "c", "d"):
        store.publish(tag, {"t": Table(rows)})
    store.publish("b.1", {"t": Table(rows[:2])}, base="b")
    store.publish("e", {"t": Table(rows)})
    store.pin("a")
    store.lease(["b.1", "b"], "host:1:1", ttl_s=60)
    store.lease(["c"], "host:2:1", ttl_s=-1)  # expired: a replica that died
    # keep the newest 1 (e); a pinned; b.1 leased, and b its base; c's lease has expired
    assert [r.version for r in store.collectable(keep=1)] == ["c", "d"]
    assert store.leases() == {"b": ["host:1:1"], "b.1": ["host:1:1"]}
    with pytest.raises(EmbeddingDataError, match="served now by 1 replica"):
        store.delete("b.1")
    store.release(["b.1", "b"], "host:1:1")
    config = config_file(tmp_path, redis_cluster)
    assert cli.main(["embeddings", "gc", "--config", config, "--keep", "1", "--dry-run"]) == 0
    assert "would delete 4 version(s): b.1, b, c, d" in capsys.readouterr().out
    assert cli.main(["embeddings", "gc", "--config", config, "--keep", "1"]) == 0
    assert [r.version for r in store.versions()] == ["a", "e"]
