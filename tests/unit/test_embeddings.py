"""The embedding store's pieces that need no cluster: its config section, the key layout
(buckets, hash slots), version records, table checks, and the CLI's help. A store that
cannot be reached (a closed loopback port) is tested here too: nothing answers it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mpsserve.config import EmbeddingsConfig, load_config, parse_config
from mpsserve.embeddings.layout import (
    MAX_BUCKETS,
    MIN_BUCKETS,
    SLOTS,
    Layout,
    check_name,
    default_buckets,
    encode_ids,
    group_by_bucket,
    key_slot,
)
from mpsserve.embeddings.registry import TableInfo, VersionRecord
from mpsserve.embeddings.store import EmbeddingStore, Table
from mpsserve.errors import (
    ConfigError,
    EmbeddingDataError,
    EmbeddingStoreError,
    InvalidInput,
)
from mpsserve.ops import cli
from tests.redis_cluster import free_port

MODELS = [{"name": "rec", "store": "/s"}]


def service(embeddings: object, check_files: bool = True) -> object:
    return parse_config({"models": MODELS, "embeddings": embeddings}, check_files=check_files)


# -- config --------------------------------------------------------------------------------


def test_no_section_is_no_tier_and_a_minimal_one_has_defaults() -> None:
    assert parse_config({"models": MODELS}).embeddings is None
    store = service({"nodes": ["redis-0.redis:6379", "[::1]:7000"]}).embeddings  # type: ignore[attr-defined]
    assert store.key_prefix == "mpsserve" and store.retries == 1 and store.password() is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"nodes": []}, "embeddings.nodes: List should have at least 1 item"),
        ({"nodes": ["redis-0"]}, "embeddings.nodes.0: String should match pattern"),
        ({"nodes": ["a:1"], "password": "x"}, "embeddings.password: Extra inputs"),
        ({"nodes": ["a:1"], "key_prefix": "a{b}"}, "embeddings.key_prefix: String should match"),
        ({"nodes": ["a:1"], "command_timeout_s": 0}, "embeddings.command_timeout_s: Input should"),
        (
            {"nodes": ["a:1"], "password_env": "A", "password_file": "/f"},
            "give password_env or password_file, not both",
        ),
    ],
)
def test_a_bad_section_names_the_field(section: object, message: str) -> None:
    with pytest.raises(ConfigError, match="invalid config") as raised:
        service(section, check_files=False)
    assert message in raised.value.message


def test_secrets_come_from_env_or_file_and_are_checked_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MPSSERVE_TEST_REDIS_PW", raising=False)
    with pytest.raises(ConfigError, match="MPSSERVE_TEST_REDIS_PW is not set or empty"):
        service({"nodes": ["a:1"], "password_env": "MPSSERVE_TEST_REDIS_PW"})
    with pytest.raises(ConfigError, match="cannot read /no/such/file"):
        service({"nodes": ["a:1"], "password_file": "/no/such/file"})
    monkeypatch.setenv("MPSSERVE_TEST_REDIS_PW", "s3cret-from-env")
    by_env = service({"nodes": ["a:1"], "password_env": "MPSSERVE_TEST_REDIS_PW"})
    assert by_env.embeddings.password() == "s3cret-from-env"  # type: ignore[attr-defined]
    (tmp_path / "pw").write_text("s3cret-from-file\n")
    (tmp_path / "service.yaml").write_text(
        yaml.safe_dump({"models": MODELS, "embeddings": {"nodes": ["a:1"], "password_file": "pw"}})
    )
    config = load_config(tmp_path / "service.yaml")  # relative to the config file
    assert config.embeddings is not None
    assert config.embeddings.password_file == str(tmp_path / "pw")
    assert config.embeddings.password() == "s3cret-from-file"
    assert "s3cret" not in repr(config)  # the YAML holds only where the secret is


# -- layout ----------------------------------------------------------------------------------


def test_names_that_would_break_a_key_are_refused() -> None:
    assert check_name("table", "cat_0.v-2") == "cat_0.v-2"
    for bad in ("a:b", "a{b}", "", "-a", "x" * 64, "a b"):
        with pytest.raises(InvalidInput, match="table"):
            check_name("table", bad)


def test_default_buckets_are_bounded() -> None:
    assert default_buckets(10) == MIN_BUCKETS
    assert default_buckets(2_600_000) == 318
    assert default_buckets(10**13) == MAX_BUCKETS


def test_a_tables_buckets_spread_over_three_shards_and_the_registry_is_one_slot() -> None:
    layout = Layout("mpsserve")
    slots = np.array([key_slot(k) for k in layout.table_keys("v1", "cat", MIN_BUCKETS)])
    per_shard = np.bincount(np.minimum(slots // (SLOTS // 3), 2), minlength=3)
    assert per_shard.min() > MIN_BUCKETS * 0.2, per_shard  # none starved (even: 1/3 each)
    assert "{" not in layout.row_key("v1", "cat", 0)  # no hash tag: the whole key is hashed
    assert key_slot(layout.versions_key) == key_slot(layout.pins_key)


def test_ids_are_grouped_by_bucket_each_once() -> None:
    ids = np.array([5, -3, 261, 0, 517, 2**40 + 1, 256], dtype=np.int64)
    groups = group_by_bucket(ids, 256)
    assert [g.bucket for g in groups] == sorted({int(i) % 256 for i in ids})
    assert sorted(int(p) for g in groups for p in g.positions) == list(range(len(ids)))
    for group in groups:
        assert {int(i) % 256 for i in ids[group.positions]} == {group.bucket}
    assert group_by_bucket(np.array([], dtype=np.int64), 256) == []
    assert encode_ids(np.array([1, -1])) == [(1).to_bytes(8, "little"), b"\xff" * 8]


def test_version_records_round_trip() -> None:
    record = VersionRecord("v1", {"cat": TableInfo(26000, 32, 256)}, created=1.5)
    again = VersionRecord.from_json(record.to_json())
    assert again == record and not again.complete and again.rows == 26000
    assert again.to_dict(pinned=True)["pinned"] is True


def test_tables_are_checked_before_anything_is_written() -> None:
    rows = np.zeros((3, 4), dtype=np.float64)
    ids, checked = Table(rows, np.array([7, 8, 9], dtype=np.int32)).checked("t")
    assert ids.dtype == np.int64 and checked.dtype == np.dtype("<f4")
    with pytest.raises(EmbeddingDataError, match="ids repeat"):
        Table(rows, np.array([1, 1, 2])).checked("t")
    with pytest.raises(EmbeddingDataError, match=r"rows must be \[n, dim\]"):
        Table(np.zeros(3)).checked("t")
    with pytest.raises(EmbeddingDataError, match="ids for 3 rows"):
        Table(rows, np.array([1, 2])).checked("t")


# -- a store nobody answers ------------------------------------------------------------------


def test_an_unreachable_store_is_a_clear_error_at_once() -> None:
    closed = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(EmbeddingStoreError) as raised:
        EmbeddingStore.connect(EmbeddingsConfig(nodes=[closed], connect_timeout_s=1))
    assert time.monotonic() - started < 10  # refused, not waited for
    assert raised.value.message.startswith(f"embedding store {closed}: connecting failed")
    assert "Connection refused" in raised.value.message


def test_doctor_fails_on_an_unreachable_store_whatever_mps_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mpsserve.node import doctor
    from mpsserve.node.gpu import Inventory

    monkeypatch.setattr(doctor, "inventory", lambda: Inventory(error="no driver"))
    closed = f"127.0.0.1:{free_port()}"
    config = {"models": MODELS, "mps": {"mode": "off"}, "embeddings": {"nodes": [closed]}}
    (tmp_path / "service.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["doctor", "--config", str(tmp_path / "service.yaml")]) == 1
    out = capsys.readouterr().out
    assert f"[fail] embedding store: {closed}: connecting failed" in out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("MPS is not used: mps.mode is off")
    assert f"; embedding store: {closed}: connecting failed" in verdict


def test_embeddings_commands_need_the_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "service.yaml").write_text(yaml.safe_dump({"models": MODELS}))
    assert cli.main(["embeddings", "list", "--config", str(tmp_path / "service.yaml")]) == 2
    assert "has no embeddings section" in capsys.readouterr().err


def test_every_embeddings_action_and_flag_has_help() -> None:
    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    group = commands.choices["embeddings"]
    actions = next(a for a in group._actions if isinstance(a, argparse._SubParsersAction))
    assert set(actions.choices) == {"publish", "list", "delete", "pin", "unpin", "gc"}
    helps = {c.dest: c.help for c in actions._choices_actions}
    for name, sub in actions.choices.items():
        assert helps.get(name), name
        for arg in sub._actions:
            assert arg.help and arg.help.strip(), (name, arg.option_strings)
            if arg.default not in (None, False, argparse.SUPPRESS) and not arg.required:
                assert "default" in arg.help, (name, arg.option_strings)


def test_status_shows_an_unreachable_store_as_a_problem() -> None:
    from mpsserve.ops.status import render, with_store

    closed = f"127.0.0.1:{free_port()}"
    report = {
        "app": "mpsserve",
        "applications": {"mpsserve": {"status": "RUNNING", "deployments": {}}},
        "ok": True,
        "verdict": "OK: 2 model replica(s) answer, MPS off",
    }
    report = with_store(report, EmbeddingsConfig(nodes=[closed]))
    assert report["ok"] is False and isinstance(report["verdict"], str)
    assert report["verdict"].startswith(f"PROBLEM: embedding store: {closed}: connecting failed")
    assert report["verdict"].endswith("; 2 model replica(s) answer, MPS off")
    screen = render(report)
    assert f"embedding store: PROBLEM: {closed}: connecting failed" in screen
    assert with_store({"ok": True, "verdict": "OK: x"}, None) == {"ok": True, "verdict": "OK: x"}


def test_a_redeploy_says_the_embeddings_section_changed() -> None:
    from mpsserve.ops import changes

    old = parse_config({"models": MODELS})
    new = parse_config({"models": MODELS, "embeddings": {"nodes": ["redis-0:6379"]}})
    lines = changes.describe_changes(old, new)
    assert any(line.startswith("embeddings: ") and "nodes None -> ['redis-0:6379']" in line
               for line in lines), lines  # fmt: skip
    assert "embeddings" in changes._shared_changes(old, new)


def test_the_node_cache_room_is_checked_against_the_largest_version(tmp_path: Path) -> None:
    from mpsserve.embeddings.probe import node_cache_room

    config = EmbeddingsConfig(
        nodes=["127.0.0.1:7000"], node_cache_dir=str(tmp_path / "cache"), node_cache_rows=2**30
    )
    small = {"version": "a", "base": None, "tables": {"t": {"rows": 1000, "dim": 32}}}
    room, detail = node_cache_room(config, [small])
    assert room and f"{tmp_path}/cache/mpsserve-" in detail and "needs 0 MiB" in detail
    huge = {"version": "b", "base": None, "tables": {"t": {"rows": 2**40, "dim": 4096}}}
    room, detail = node_cache_room(config, [small, huge])
    assert not room and "raise its size or lower node_cache_rows" in detail
    off = config.model_copy(update={"node_cache_rows": 0})
    assert node_cache_room(off, [huge]) == (True, "off (embeddings.node_cache_rows is 0)")


def test_a_lookup_that_fails_while_seeding_lets_go_of_its_caches_and_leases(
    tmp_path: Path,
) -> None:
    from mpsserve.embeddings.lookup import EmbeddingTier
    from mpsserve.errors import EmbeddingStoreError

    infos = {"t": TableInfo(100, 4, 256)}
    records = {
        "v1": VersionRecord("v1", infos, state="complete"),
        "v1.1": VersionRecord("v1.1", infos, state="complete", base="v1"),
    }

    class Store:
        def __init__(self) -> None:
            self.released: list[str] = []

        def require(self, version: str, dims: object = None) -> VersionRecord:
            return records[version]

        def chain(self, version: str) -> list[VersionRecord]:
            return [records[v] for v in (["v1.1", "v1"] if version == "v1.1" else ["v1"])]

        def dims(self, version: str) -> dict[str, int]:
            return {"t": 4}

        def lease(self, versions: list[str], holder: str, ttl_s: float) -> None:
            pass

        def release(self, versions: list[str], holder: str) -> None:
            self.released += versions

        def changed_ids(self, version: str, table: str) -> np.ndarray:
            raise EmbeddingStoreError("embedding store: a shard is down")

    config = EmbeddingsConfig(nodes=["127.0.0.1:7000"], node_cache_dir=str(tmp_path))
    tier = EmbeddingTier(config)
    store = Store()
    tier._store = store  # type: ignore[assignment]
    base = tier.lookup("v1", {"t": None})
    with pytest.raises(EmbeddingStoreError, match="a shard is down"):
        tier.lookup("v1.1", {"t": None}, previous=base)
    assert store.released == ["v1.1"]  # v1 is still used by the base's lookup
    assert [p.name for p in tier.cache_dir.glob("*.rows")] == ["v1.t.d4.c128.rows"]
    base.close()
    assert not list(tier.cache_dir.glob("*.rows")) and store.released == ["v1.1", "v1"]
