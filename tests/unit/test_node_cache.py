"""The node's shared embedding cache (``mpsserve.embeddings.node_cache``): capacity, exact rows
back, misses, slot conflicts, sharing between objects and processes, no torn rows while other
processes write, files of another layout refused, a full disk reported, and the files removed
by their last user or by ``sweep``. Files go under pytest's tmp_path, not /dev/shm."""

from __future__ import annotations

import errno
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mpsserve.embeddings import node_cache
from mpsserve.embeddings.node_cache import NodeCache, cache_capacity, file_bytes, sweep
from mpsserve.errors import EmbeddingCacheError, InvalidInput

DIM = 8
SPAWN = multiprocessing.get_context("spawn")
CHILD_TIMEOUT_S = 60


def rows_of(ids: np.ndarray | list[int], dim: int = DIM) -> np.ndarray:
    """Each id's row is a function of the id, so a row read back can be checked exactly."""
    return (np.asarray(ids, dtype=np.float32)[:, None] + np.arange(dim, dtype=np.float32)).astype(
        np.float32
    )


def cache_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_capacity_is_a_power_of_two_within_the_limit() -> None:
    assert cache_capacity(1000, 1 << 20) == 1024
    assert cache_capacity(1024, 1 << 20) == 1024
    assert cache_capacity(1025, 1 << 20) == 2048
    assert cache_capacity(1_000_000, 300_000) == 262_144  # the largest power of two <= limit
    assert cache_capacity(5, 4) == 4
    assert cache_capacity(1, 1) == 1
    assert cache_capacity(0, 100) == 1
    assert cache_capacity(1000, 0) == 0  # no cache
    with pytest.raises(ValueError):
        cache_capacity(-1, 10)


def test_get_after_put_returns_the_exact_rows_and_misses_are_misses(tmp_path: Path) -> None:
    with NodeCache.open(tmp_path, "v1", "cat", DIM, 1024) as cache:
        assert cache.path.name == "v1.cat.d8.c1024.rows"
        assert cache.path.stat().st_size == file_bytes(DIM, 1024)
        rng = np.random.default_rng(1)
        ids = rng.choice(1000, 300, replace=False).astype(np.int64)
        values = rng.standard_normal((300, DIM)).astype(np.float32)
        cache.put(ids, values)
        wanted = np.concatenate([ids[:100], [1000, 1001, -1], ids[100:]])
        rows, hit = cache.get(wanted)
        assert rows.shape == (len(wanted), DIM) and rows.dtype == np.float32
        assert hit.tolist() == [True] * 100 + [False] * 3 + [True] * 200
        assert np.array_equal(rows[hit], np.concatenate([values[:100], values[100:]]))
        empty_rows, empty_hit = cache.get(np.empty(0, np.int64))
        assert empty_rows.shape == (0, DIM) and empty_hit.shape == (0,)
        cache.put(np.empty(0, np.int64), np.empty((0, DIM), np.float32))
        assert cache.stats() == {
            "path": str(cache.path),
            "dim": DIM,
            "capacity": 1024,
            "bytes": file_bytes(DIM, 1024),
            "filled": 300,
        }


def test_ids_sharing_a_slot_the_last_written_wins_never_a_wrong_row(tmp_path: Path) -> None:
    with NodeCache.open(tmp_path, "v1", "cat", DIM, 8) as cache:
        cache.put(np.array([3]), rows_of([3]))
        cache.put(np.array([11]), rows_of([11]))  # slot 11 & 7 = 3
        rows, hit = cache.get(np.array([3, 11]))
        assert hit.tolist() == [False, True] and np.array_equal(rows[1], rows_of([11])[0])
        cache.put(np.array([19, -5, 4]), rows_of([19, -5, 4]))  # -5 & 7 = 3 too: last wins
        rows, hit = cache.get(np.array([3, 11, 19, -5, 4]))
        assert hit.tolist() == [False, False, False, True, True]
        assert np.array_equal(rows[hit], rows_of([-5, 4]))
        assert cache.stats()["filled"] == 2


def test_names_and_shapes_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        NodeCache.open(tmp_path, "v1", "../cat", DIM, 8)
    with pytest.raises(InvalidInput):
        NodeCache.open(tmp_path, "a/b", "cat", DIM, 8)
    with pytest.raises(ValueError, match="power-of-two"):
        NodeCache.open(tmp_path, "v1", "cat", DIM, 12)
    with (
        NodeCache.open(tmp_path, "v1", "cat", DIM, 8) as cache,
        pytest.raises(ValueError, match="rows"),
    ):
        cache.put(np.arange(3), np.zeros((3, DIM + 1), np.float32))
    assert cache_files(tmp_path) == []


def test_a_second_object_on_the_same_file_sees_the_rows(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "dir"  # made by open
    first = NodeCache.open(directory, "v1", "cat", DIM, 64)
    second = NodeCache.open(directory, "v1", "cat", DIM, 64)
    first.put(np.arange(10), rows_of(np.arange(10)))
    rows, hit = second.get(np.arange(20))
    assert hit.tolist() == [True] * 10 + [False] * 10
    assert np.array_equal(rows[:10], rows_of(np.arange(10)))
    first.close()
    first.close()  # idempotent
    with pytest.raises(EmbeddingCacheError, match="closed"):
        first.get(np.arange(3))
    assert cache_files(directory) == ["v1.cat.d8.c64.rows", "v1.cat.d8.c64.rows.lock"]
    assert second.get(np.arange(10))[1].all()  # still in use by the second: kept
    second.close()
    assert cache_files(directory) == []  # its last user removed it


def share_with_parent(directory: Path, ready: Any, go: Any, out: Any) -> None:
    """A second process: report whether it sees the parent's rows, put its own, then hold the
    cache until the parent says go."""
    cache = NodeCache.open(directory, "v1", "cat", DIM, 256)
    rows, hit = cache.get(np.arange(100))
    out.put((int(hit.sum()), bool(np.array_equal(rows, rows_of(np.arange(100))))))
    cache.put(np.arange(100, 200), rows_of(np.arange(100, 200)))
    ready.set()
    go.wait(CHILD_TIMEOUT_S)
    cache.close()


def test_another_process_shares_the_rows_and_the_last_to_close_removes_them(
    tmp_path: Path,
) -> None:
    cache = NodeCache.open(tmp_path, "v1", "cat", DIM, 256)
    cache.put(np.arange(100), rows_of(np.arange(100)))
    ready, go, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    child = SPAWN.Process(target=share_with_parent, args=(tmp_path, ready, go, out))
    child.start()
    try:
        assert out.get(timeout=CHILD_TIMEOUT_S) == (100, True)
        assert ready.wait(CHILD_TIMEOUT_S)
        rows, hit = cache.get(np.arange(100, 200))
        assert hit.all() and np.array_equal(rows, rows_of(np.arange(100, 200)))
        cache.close()  # the child still holds it: kept
        assert cache_files(tmp_path) == ["v1.cat.d8.c256.rows", "v1.cat.d8.c256.rows.lock"]
    finally:
        go.set()
        child.join(CHILD_TIMEOUT_S)
    assert child.exitcode == 0
    assert cache_files(tmp_path) == []  # the child was the last user


#: The torn-read test: ids 0..1023 over 16 slots (64 ids a slot), rows of 256 floats.
TORN_IDS, TORN_SLOTS, TORN_DIM, TORN_READ_S = 1024, 16, 256, 1.5


def write_until_stopped(directory: Path, seed: int, started: Any, stop: Any) -> None:
    """A writer process: put batches of colliding ids, each row a function of its id."""
    cache = NodeCache.open(directory, "v1", "cat", TORN_DIM, TORN_SLOTS)
    rng = np.random.default_rng(seed)
    started.wait(CHILD_TIMEOUT_S)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not stop.is_set() and time.monotonic() < deadline:
        ids = rng.choice(TORN_IDS, 48, replace=False).astype(np.int64)
        cache.put(ids, rows_of(ids, TORN_DIM))
    cache.close()


def test_readers_never_see_a_torn_row_while_two_processes_write(tmp_path: Path) -> None:
    cache = NodeCache.open(tmp_path, "v1", "cat", TORN_DIM, TORN_SLOTS)
    started, stop = SPAWN.Barrier(3), SPAWN.Event()
    writers = [
        SPAWN.Process(target=write_until_stopped, args=(tmp_path, seed, started, stop))
        for seed in (1, 2)
    ]
    for writer in writers:
        writer.start()
    rng = np.random.default_rng(3)
    reads = hits = 0
    try:
        started.wait(CHILD_TIMEOUT_S)
        deadline = time.monotonic() + TORN_READ_S
        while time.monotonic() < deadline:
            ids = rng.choice(TORN_IDS, 64, replace=False).astype(np.int64)
            rows, hit = cache.get(ids)
            assert np.array_equal(rows[hit], rows_of(ids[hit], TORN_DIM)), "a torn or wrong row"
            reads, hits = reads + 1, hits + int(hit.sum())
    finally:
        stop.set()
        for writer in writers:
            writer.join(CHILD_TIMEOUT_S)
    assert [w.exitcode for w in writers] == [0, 0]
    assert reads > 50 and hits > 0, (reads, hits)
    seq = np.frombuffer(cache.path.read_bytes(), np.int64, TORN_SLOTS, node_cache.HEADER_BYTES)
    assert (seq > 0).all() and (seq % 2 == 0).all()  # every slot written, none left odd
    cache.close()


def test_a_slot_left_odd_by_a_dead_writer_is_a_miss_then_repaired(tmp_path: Path) -> None:
    with NodeCache.open(tmp_path, "v1", "cat", DIM, 8) as cache:
        cache.put(np.arange(8), rows_of(np.arange(8)))
        seq = np.memmap(cache.path, np.int64, "r+", node_cache.HEADER_BYTES, (8,))
        seq[2] += 1  # as a writer killed between its two seq stores leaves it
        seq.flush()
        assert cache.get(np.arange(8))[1].tolist() == [True, True, False] + [True] * 5
        cache.put(np.array([10]), rows_of([10]))
        rows, hit = cache.get(np.array([2, 10]))
        assert hit.tolist() == [False, True] and np.array_equal(rows[1], rows_of([10])[0])
        assert seq[2] % 2 == 0
        del seq


def test_a_file_of_another_layout_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "v1.cat.d8.c8.rows"
    path.write_bytes(b"NOTOURS!" + bytes(file_bytes(DIM, 8) - 8))
    with pytest.raises(EmbeddingCacheError, match="header") as info:
        NodeCache.open(tmp_path, "v1", "cat", DIM, 8)
    assert str(path) in info.value.message and str(file_bytes(DIM, 8)) in info.value.message
    header = node_cache.MAGIC + np.array([DIM + 1, 8], "<i8").tobytes()
    path.write_bytes(header + bytes(file_bytes(DIM, 8) - len(header)))
    with pytest.raises(EmbeddingCacheError, match="header"):
        NodeCache.open(tmp_path, "v1", "cat", DIM, 8)
    path.write_bytes(b"\1" * 100)
    with pytest.raises(EmbeddingCacheError, match="has 100 bytes") as info:
        NodeCache.open(tmp_path, "v1", "cat", DIM, 8)
    assert str(path) in info.value.message
    assert path.read_bytes() == b"\1" * 100  # not ours to remove


def test_a_full_disk_is_an_error_naming_the_file_and_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(EmbeddingCacheError) as info:
        NodeCache.open(tmp_path, "v1", "cat", DIM, 1 << 16)
    message = info.value.message
    assert str(tmp_path / "v1.cat.d8.c65536.rows") in message
    assert f"({file_bytes(DIM, 1 << 16)} bytes)" in message
    assert "No space left on device" in message and "bytes free there" in message
    assert info.value.http_status == 503
    assert cache_files(tmp_path) == []  # the empty file it made is gone


def test_no_memory_to_map_it_is_an_error_and_the_file_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(node_cache.mmap, "mmap", no_memory)
    with pytest.raises(EmbeddingCacheError, match="Cannot allocate memory"):
        NodeCache.open(tmp_path, "v1", "cat", DIM, 8)
    assert cache_files(tmp_path) == []


def test_a_weakly_ordered_cpu_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_cache.platform, "machine", lambda: "aarch64")
    with pytest.raises(EmbeddingCacheError, match="not safe on aarch64"):
        NodeCache.open(tmp_path, "v1", "cat", DIM, 8)
    assert cache_files(tmp_path) == []


def open_and_die(directory: Path) -> None:
    """A process that dies with its cache open (no close): its file is left behind."""
    cache = NodeCache.open(directory, "dead", "cat", DIM, 8)
    cache.put(np.arange(4), rows_of(np.arange(4)))
    os._exit(0)


def test_sweep_removes_the_files_of_dead_processes_and_keeps_those_in_use(
    tmp_path: Path,
) -> None:
    assert sweep(tmp_path / "missing") == []
    live = NodeCache.open(tmp_path, "live", "cat", DIM, 8)
    live.put(np.arange(4), rows_of(np.arange(4)))
    child = SPAWN.Process(target=open_and_die, args=(tmp_path,))
    child.start()
    child.join(CHILD_TIMEOUT_S)
    assert child.exitcode == 0
    dead = tmp_path / "dead.cat.d8.c8.rows"
    assert dead.exists()
    (tmp_path / "gone.cat.d8.c8.rows.lock").touch()  # a remover died between its unlinks
    assert sweep(tmp_path) == [dead]
    assert cache_files(tmp_path) == ["live.cat.d8.c8.rows", "live.cat.d8.c8.rows.lock"]
    assert live.get(np.arange(4))[1].all()
    assert sweep(tmp_path) == []
    live.close()
    assert cache_files(tmp_path) == []


def test_a_new_version_is_seeded_from_its_base_less_the_changed_ids(tmp_path: Path) -> None:
    ids = np.arange(0, 600, dtype=np.int64)
    with NodeCache.open(tmp_path, "v1", "cat", DIM, 1024) as base:
        base.put(ids, rows_of(ids))
        with NodeCache.open(tmp_path, "v1.1", "cat", DIM, 1024) as delta:
            changed = np.array([3, 4, 500, 9999], dtype=np.int64)
            assert delta.seed_from(base, changed) == 597
            rows, hit = delta.get(ids)
            assert not hit[[3, 4, 500]].any() and hit.sum() == 597
            assert np.array_equal(rows[hit], rows_of(ids[hit]))
            assert delta.seed_from(base, changed) == 0  # not empty any more: left as it is
        with NodeCache.open(tmp_path, "v2", "cat", DIM, 2048) as other:
            assert other.seed_from(base, changed) == 0  # another layout
            assert not other.get(ids)[1].any()
