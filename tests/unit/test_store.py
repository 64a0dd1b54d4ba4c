"""The model store on real filesystems: local paths, fsspec's memory://, and S3 via moto."""

from __future__ import annotations

import logging
import multiprocessing
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from mpsserve.config import VersionPolicy
from mpsserve.errors import ModelLoadError, ModelNotReady
from mpsserve.model.store import MANIFEST, ModelStore, Scan
from tests.conftest import SMALL
from tests.s3server import new_bucket, s3_endpoint, storage_options

__all__ = ["s3_endpoint"]  # the fixture, imported for pytest

TF = ("saved_model.pb",)
MARKER = "_SUCCESS"

#: The layout every backend gets: each entry and its files (comments: why it does not count).
LAYOUT: dict[str, dict[str, bytes] | None] = {
    "1": {"saved_model.pb": b"pb-1", "variables/variables.index": b"idx", MARKER: b""},
    "2": {"saved_model.pb": b"pb-two", "variables/variables.index": b"idx-2", MARKER: b""},
    "3": {"saved_model.pb": b"pb-3"},  # uploaded, marker not written yet
    "4": {},  # an empty directory
    "5": {"fingerprint.pb": b"x", MARKER: b""},  # the required file is missing
    "notes": {"README": b"not a version"},
    "007": {"saved_model.pb": b"aliases 7"},
    ".6.partial": {"saved_model.pb": b"a writer's staging dir"},
    "latest": {"saved_model.pb": b"a name, not a number"},
}


def write_layout(fs: fsspec.AbstractFileSystem, base: str) -> None:
    for entry, files in LAYOUT.items():
        fs.makedirs(f"{base}/{entry}", exist_ok=True)
        for rel, data in (files or {}).items():
            fs.makedirs(f"{base}/{entry}/{rel}".rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(f"{base}/{entry}/{rel}", data)
    fs.pipe_file(f"{base}/8", b"a file named like a version")


@pytest.fixture
def memfs() -> Iterator[MemoryFileSystem]:
    """fsspec's in-memory filesystem, emptied before and after (it is global per process)."""
    fs = fsspec.filesystem("memory")

    def clear() -> None:
        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs[:] = [""]

    clear()
    yield fs
    clear()


@pytest.fixture(params=["path", "file", "memory"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path, memfs: MemoryFileSystem) -> str:
    """A store holding LAYOUT, as a plain path, a file:// URI and a memory:// URI."""
    if request.param == "memory":
        write_layout(memfs, "/models/rec")
        return "memory://models/rec"
    base = tmp_path / "models" / "rec"
    write_layout(fsspec.filesystem("file"), str(base))
    return str(base) if request.param == "path" else f"file://{base}"


def test_scan_counts_complete_versions_and_says_why_others_do_not(
    store_uri: str, tmp_path: Path
) -> None:
    scan = ModelStore(store_uri, tmp_path / "cache", TF, marker=MARKER).scan()
    assert scan == Scan(
        complete=[1, 2],
        skipped={
            3: "marker _SUCCESS missing",
            4: "empty",
            5: "no saved_model.pb",
            8: "not a directory",
        },
    )
    no_marker = ModelStore(store_uri, tmp_path / "cache", TF).scan()
    assert no_marker.complete == [1, 2, 3]
    assert no_marker.skipped == {4: "empty", 5: "no saved_model.pb", 8: "not a directory"}
    both = ModelStore(store_uri, tmp_path / "cache", ("saved_model.pb", "signature.json"), MARKER)
    assert both.scan().skipped[3] == "no signature.json; marker _SUCCESS missing"
    nested = ModelStore(store_uri, tmp_path / "cache", ("variables/variables.index",))
    assert nested.scan().complete == [1, 2]


def test_latest_versions_and_select(store_uri: str, tmp_path: Path) -> None:
    store = ModelStore(store_uri, tmp_path / "cache", TF, marker=MARKER)
    assert store.versions() == [1, 2]
    assert store.latest() == 2
    assert store.select(VersionPolicy(latest=1)) == [2]
    assert store.select(VersionPolicy(latest=2)) == [1, 2]
    assert store.select(VersionPolicy(latest=5)) == [1, 2]
    assert store.select(VersionPolicy(specific=[3, 1])) == [1]  # 3 is incomplete
    assert store.select(VersionPolicy(specific=[9])) == []


def test_a_store_without_versions(tmp_path: Path, memfs: MemoryFileSystem) -> None:
    missing = ModelStore(str(tmp_path / "nothing-here"), tmp_path / "cache", TF)
    assert missing.scan() == Scan()
    assert missing.select(VersionPolicy()) == []
    memfs.makedirs("/models/rec/1", exist_ok=True)
    memfs.pipe_file("/models/rec/1/saved_model.pb", b"pb")
    pending = ModelStore("memory://models/rec", tmp_path / "cache", TF, marker=MARKER)
    with pytest.raises(ModelNotReady, match="no complete version yet; 1: marker _SUCCESS"):
        pending.latest()


def test_listing_a_base_that_cannot_be_listed_names_the_uri(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where a directory should be")
    broken = str(tmp_path / "file" / "models")
    with pytest.raises(ModelLoadError, match=f"cannot list model store '{re.escape(broken)}'"):
        ModelStore(broken, tmp_path / "cache").scan()


def test_an_unknown_protocol_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot open model store 'nosuch://x'"):
        ModelStore("nosuch://x", tmp_path)


def test_local_fetch_is_the_version_directory_itself(tmp_path: Path) -> None:
    base = tmp_path / "models" / "rec"
    write_layout(fsspec.filesystem("file"), str(base))
    store = ModelStore(f"file://{base}", tmp_path / "cache", TF, marker=MARKER)
    assert store.fetch(2) == base / "2"
    assert store.fetch(1) == base / "1"
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ModelLoadError, match=r"version 3 .* incomplete: marker _SUCCESS missing"):
        store.fetch(3)
    with pytest.raises(ModelLoadError, match=r"version 9 .* missing or empty"):
        store.fetch(9)


class DownloadLog(logging.Handler):
    """Counts the store's "download starts" lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.starts = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.starts += record.getMessage().startswith("download starts")


@pytest.fixture
def downloads() -> Iterator[DownloadLog]:
    log = logging.getLogger("mpsserve.model.store")
    handler, level = DownloadLog(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


def test_remote_fetch_copies_once_and_verifies(
    memfs: MemoryFileSystem, tmp_path: Path, downloads: DownloadLog
) -> None:
    write_layout(memfs, "/models/rec")
    cache = tmp_path / "cache"
    store = ModelStore("memory://models/rec", cache, TF, marker=MARKER)
    path = store.fetch(1)
    assert path == cache / "1"
    assert (path / "saved_model.pb").read_bytes() == b"pb-1"
    assert (path / "variables" / "variables.index").read_bytes() == b"idx"
    assert (path / MARKER).exists()
    manifest = (path / MANIFEST).stat()
    assert store.fetch(1) == store.fetch(1) == path
    assert downloads.starts == 1
    assert (path / MANIFEST).stat().st_mtime_ns == manifest.st_mtime_ns
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == ["1"]


def test_a_reuploaded_version_is_fetched_again(
    memfs: MemoryFileSystem, tmp_path: Path, downloads: DownloadLog
) -> None:
    write_layout(memfs, "/models/rec")
    store = ModelStore("memory://models/rec", tmp_path / "cache", TF, marker=MARKER)
    path = store.fetch(1)
    memfs.pipe_file("/models/rec/1/saved_model.pb", b"a new, longer graph")
    assert store.fetch(1) == path
    assert (path / "saved_model.pb").read_bytes() == b"a new, longer graph"
    assert downloads.starts == 2
    (path / "variables" / "variables.index").write_bytes(b"")  # damaged in the cache
    assert (store.fetch(1) / "variables" / "variables.index").read_bytes() == b"idx"
    assert downloads.starts == 3
    memfs.pipe_file("/models/rec/1/saved_model.pb", b"A NEW, LONGER GRAPH")  # same size
    assert (store.fetch(1) / "saved_model.pb").read_bytes() == b"A NEW, LONGER GRAPH"
    assert downloads.starts == 4


def test_a_vanished_version_is_a_load_error_and_leaves_no_copy(
    memfs: MemoryFileSystem, tmp_path: Path
) -> None:
    write_layout(memfs, "/models/rec")
    cache = tmp_path / "cache"
    store = ModelStore("memory://models/rec", cache, TF, marker=MARKER)
    assert 2 in store.versions()
    memfs.rm("/models/rec/2", recursive=True)
    with pytest.raises(ModelLoadError, match="version 2 of memory://models/rec is missing"):
        store.fetch(2)
    with pytest.raises(ModelLoadError, match=r"version 3 .* incomplete: marker _SUCCESS missing"):
        store.fetch(3)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


class RacedStore(ModelStore):
    """A store whose listing is changed before the download, as a racing writer would do it.

    The download itself still goes through the real filesystem; only what we believe the
    version holds is edited (fsspec is not mocked).
    """

    def __init__(self, *args: Any, edit: Callable[[dict[str, Any]], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.edit = edit

    def _listing(self, version: int) -> dict[str, Any]:
        files = super()._listing(version)
        self.edit(files)
        return files


def grow(files: dict[str, Any]) -> None:
    files["saved_model.pb"] = {**files["saved_model.pb"], "size": 5}


def vanish(files: dict[str, Any]) -> None:
    files["variables/gone"] = {"name": "/models/rec/1/variables/gone", "size": 3, "type": "file"}


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (grow, r"saved_model.pb has 4 bytes, the store lists 5"),
        (vanish, r"cannot download memory://models/rec/1: .*gone"),
    ],
)
def test_a_failed_download_leaves_no_partial_copy(
    memfs: MemoryFileSystem, tmp_path: Path, edit: Callable[[dict[str, Any]], None], error: str
) -> None:
    write_layout(memfs, "/models/rec")
    cache = tmp_path / "cache"
    store = RacedStore("memory://models/rec", cache, TF, marker=MARKER, edit=edit)
    with pytest.raises(ModelLoadError, match=error):
        store.fetch(1)
    assert [p.name for p in cache.iterdir()] == [".1.lock"]
    good = ModelStore("memory://models/rec", cache, TF, marker=MARKER).fetch(1)
    with pytest.raises(ModelLoadError, match=error):
        store.fetch(1)  # a failed refresh keeps the previous verified copy
    assert (good / "saved_model.pb").read_bytes() == b"pb-1"
    assert sorted(p.name for p in cache.iterdir()) == [".1.lock", "1"]


def test_prune_cache_removes_only_cached_copies(memfs: MemoryFileSystem, tmp_path: Path) -> None:
    write_layout(memfs, "/models/rec")
    cache = tmp_path / "cache"
    store = ModelStore("memory://models/rec", cache, TF, marker=MARKER)
    store.fetch(1), store.fetch(2)
    assert store.prune_cache(keep={2}) == [1]
    assert not (cache / "1").exists() and (cache / "2" / MANIFEST).exists()
    assert store.prune_cache(keep={2}) == []
    assert store.versions() == [1, 2]  # the store itself is untouched
    assert store.prune_cache(keep=set()) == [2]
    local = tmp_path / "local"
    write_layout(fsspec.filesystem("file"), str(local))
    assert ModelStore(str(local), local, TF).prune_cache(keep=set()) == []  # never the store
    assert (local / "1" / "saved_model.pb").exists()


# -- S3, through a real S3 API server (moto) on loopback ----------------------------------


def s3(endpoint: str) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("s3", **storage_options(endpoint))


def upload(endpoint: str, source: Path, target: str, marker: bool = True) -> None:
    """Put a local version directory at ``target`` (bucket/key prefix), the marker last."""
    s3(endpoint).put(f"{source}/", f"{target}/", recursive=True)
    if marker:
        s3(endpoint).pipe_file(f"{target}/{MARKER}", b"")


@pytest.fixture
def s3_store(s3_endpoint: str, tf_store: Path) -> tuple[str, dict[str, Any]]:
    """A fresh bucket holding version 1 of the small TensorFlow demo model, marker included."""
    bucket = new_bucket(s3_endpoint)
    upload(s3_endpoint, tf_store / "1", f"{bucket}/models/rec/1")
    return f"s3://{bucket}/models/rec", storage_options(s3_endpoint)


def test_s3_version_is_fetched_and_loads(
    s3_store: tuple[str, dict[str, Any]], tmp_path: Path, downloads: DownloadLog
) -> None:
    from mpsserve.model.runtime import RuntimeOptions, load_runtime
    from mpsserve.ops.demo import make_request

    uri, options = s3_store
    store = ModelStore(uri, tmp_path / "cache", TF, marker=MARKER, storage_options=options)
    assert store.scan() == Scan(complete=[1])
    assert store.latest() == 1
    path = store.fetch(1)
    assert path == tmp_path / "cache" / "1"
    assert store.fetch(1) == path and downloads.starts == 1
    runtime = load_runtime("tensorflow", path, RuntimeOptions(device="cpu"))
    scores = runtime.predict(make_request(SMALL, rows=4))["score"]
    assert scores.shape == (4,) and np.isfinite(scores).all()


def test_s3_versions_count_once_complete(
    s3_store: tuple[str, dict[str, Any]], s3_endpoint: str, tf_store: Path, tmp_path: Path
) -> None:
    uri, options = s3_store
    prefix = uri.removeprefix("s3://")
    store = ModelStore(uri, tmp_path / "cache", TF, marker=MARKER, storage_options=options)
    upload(s3_endpoint, tf_store / "1", f"{prefix}/2", marker=False)
    assert store.scan() == Scan(complete=[1], skipped={2: "marker _SUCCESS missing"})
    assert store.latest() == 1
    with pytest.raises(ModelLoadError, match="incomplete: marker _SUCCESS missing"):
        store.fetch(2)
    s3(s3_endpoint).pipe_file(f"{prefix}/2/{MARKER}", b"")  # the writer finishes
    assert store.scan() == Scan(complete=[1, 2])
    assert store.latest() == 2

    truncated = tmp_path / "truncated"
    (truncated / "variables").mkdir(parents=True)
    for rel in ("variables/variables.index", "signature.json"):
        (truncated / rel).write_bytes((tf_store / "1" / rel).read_bytes())
    upload(s3_endpoint, truncated, f"{prefix}/3")
    s3(s3_endpoint).pipe_file(f"{prefix}/4/", b"")  # a "folder" made in a console: a placeholder
    assert store.scan().skipped == {3: "no saved_model.pb", 4: "empty"}
    assert store.select(VersionPolicy(specific=[1, 3])) == [1]


def fetch_in_child(uri: str, options: dict[str, Any], cache: str, barrier: Any, out: Any) -> None:
    """One replica: wait for the others, then fetch; reports (path, downloads it started)."""
    downloads = DownloadLog()
    log = logging.getLogger("mpsserve.model.store")
    log.addHandler(downloads)
    log.setLevel(logging.INFO)
    store = ModelStore(uri, Path(cache), TF, marker=MARKER, storage_options=options)
    barrier.wait()
    out.put((str(store.fetch(1)), downloads.starts))


def test_concurrent_fetches_on_a_node_download_once(
    s3_store: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    uri, options = s3_store
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    cache = str(tmp_path / "cache")
    children = [
        ctx.Process(target=fetch_in_child, args=(uri, options, cache, barrier, out))
        for _ in range(4)
    ]
    for child in children:
        child.start()
    results = [out.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert {path for path, _ in results} == {str(tmp_path / "cache" / "1")}
    assert sum(started for _, started in results) == 1
    assert (tmp_path / "cache" / "1" / "saved_model.pb").exists()
