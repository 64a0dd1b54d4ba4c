"""A cache of embedding rows in host memory that the replica processes of one node share.

One file per (embedding version, table) in a directory on tmpfs (``/dev/shm/...``), mapped by
every process that opens it, so that a row one replica fetched from the store is a hit for the
others. Rows of a version never change, so nothing is ever invalidated: a version's file goes
away when its last user closes it, or when ``sweep`` finds that nobody uses it any more.

A file, ``<version>.<table>.d<dim>.c<capacity>.rows``, little-endian::

    header  64 bytes: b"MPSSEMB1", dim int64, capacity int64, zeros
    seq     int64[capacity]          per slot: 0 empty, odd while written, even (> 0) valid
    keys    int64[capacity]          the id whose row the slot holds
    rows    float32[capacity, dim]

Direct-mapped: id ``i`` lives in slot ``i & (capacity - 1)`` (capacity is a power of two; a
negative id too, by two's complement), so a cache as large as a table of dense ids ``0..n-1``
holds all of it without a conflict; otherwise a later id evicts the slot's earlier one.

Readers take no lock (a seqlock per slot): they copy ``seq``, ``keys`` and ``rows`` of their
slots, then ``seq`` again, and count a hit only where both copies of ``seq`` are equal, even
and non-zero and the key is the id asked for. Writers hold ``<file>.lock`` exclusively
(``flock``) and, for their slots, make ``seq`` odd, write keys and rows, then make ``seq``
even. A writer that dies half-way leaves an odd ``seq``: a miss until the slot is written
again (the next writer starts from ``seq | 1``, so ``seq`` only grows).

Memory ordering: this relies on x86-64's total store order: a core's stores reach the other
cores in program order and its loads are not reordered with its other loads. Each step above
is a separate numpy call (so no compiler reorders them) that copies element by element: an
8-byte ``seq`` or key is one aligned load or store, a row one ``memcpy`` of ``dim`` floats
(ordinary stores, or fast-string ones, which x86 keeps in order with the other stores; glibc
uses non-temporal stores only for copies of megabytes, and fences them). So the writer's odd
``seq`` is visible before its rows and its rows before its even ``seq``, and the reader loads
its first ``seq`` before the rows and the rows before its second ``seq``. On a weakly ordered
CPU (ARM, POWER) that is not enough: the writer needs a store fence between its steps and the
reader a load fence between its, which numpy cannot express, so ``open`` refuses to run there
(EmbeddingCacheError: the caller serves without the cache).

Users and clean-up, without a daemon: every process that has a file open holds a shared
``flock`` on it, which the kernel drops if the process dies. ``close`` drops its own and,
when it can then take an exclusive one at once, nobody else uses the file: it unlinks the file
and its lock file. ``sweep`` does the same for every file in a directory (those of processes
that died). Opening, closing and sweeping hold the lock file exclusively, so an open never
maps a file that a close is unlinking; a lock file is unlinked only by its holder, and a
process that then gets the lock of the unlinked one sees that the path names another file (or
none) and starts again.

Space: ``open`` reserves the whole file with ``posix_fallocate``, so a full tmpfs fails the
open (ENOSPC, an EmbeddingCacheError naming the bytes needed) instead of killing a process
with SIGBUS on a later write into the mapping. The pages are allocated then, not as rows
arrive, and count against the memory of the node (and of the cgroup of the process that
created the file). Docker's default /dev/shm is 64 MB.

A NodeCache may be shared by the threads of one process (``get`` takes no lock, ``put`` a
thread lock besides the file's), not across ``fork``: a child shares its parent's file locks,
so it must open the cache again (``put`` refuses in a forked child).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import platform
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mpsserve.embeddings.layout import ID_DTYPE, ROW_DTYPE, check_name
from mpsserve.errors import EmbeddingCacheError

logger = logging.getLogger(__name__)

MAGIC = b"MPSSEMB1"
HEADER_BYTES = 64
SEQ_DTYPE = np.dtype("<i8")
SUFFIX = ".rows"
LOCK_SUFFIX = ".lock"
FILE_MODE, DIR_MODE = 0o660, 0o770
#: CPUs with the memory order the lock-free readers rely on (see the module docstring).
TSO_MACHINES = frozenset({"x86_64", "amd64"})  # 64-bit: an int64 is one load
#: Map the whole file at open (MAP_POPULATE): no page faults on the serving path later.
MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
#: Slots ``stats`` counts per step (bounds its temporary arrays on a large cache).
STATS_CHUNK = 1 << 20


def cache_capacity(table_rows: int, limit_rows: int) -> int:
    """Slots for a table of ``table_rows`` rows with at most ``limit_rows`` slots: the smallest
    power of two that holds the whole table (no conflicts for dense ids), or the largest one
    within the limit; 0 (no cache) when the limit is 0."""
    if table_rows < 0 or limit_rows < 0:
        raise ValueError(f"rows must be >= 0, got table {table_rows}, limit {limit_rows}")
    if limit_rows == 0:
        return 0
    whole = 1 << max(table_rows - 1, 0).bit_length()
    return min(whole, 1 << (limit_rows.bit_length() - 1))


def file_name(version: str, table: str, dim: int, capacity: int) -> str:
    """The cache file of ``table`` of ``version`` (names checked: no '/' or leading '.')."""
    check_name("embedding version", version)
    check_name("table", table)
    return f"{version}.{table}.d{dim}.c{capacity}{SUFFIX}"


def file_bytes(dim: int, capacity: int) -> int:
    """The size of a cache file: header, seq, keys, rows."""
    return HEADER_BYTES + capacity * (SEQ_DTYPE.itemsize + ID_DTYPE.itemsize + dim * 4)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


class NodeCache:
    """One (version, table)'s cache file, mapped; ``open`` it, ``close`` it when done."""

    def __init__(self, path: Path, dim: int, capacity: int, fd: int, lock_fd: int) -> None:
        self.path, self.dim, self.capacity = path, dim, capacity
        self._fd, self._lock_fd = fd, lock_fd  # the file (our shared flock), its lock file
        self._mask = capacity - 1
        self._pid = os.getpid()
        self._thread_lock = threading.Lock()
        self._map: mmap.mmap | None = mmap.mmap(fd, file_bytes(dim, capacity), flags=MAP_FLAGS)
        self._seq, self._keys, self._rows = _views(self._map, dim, capacity)
        self._closed = False

    @classmethod
    def open(cls, directory: Path, version: str, table: str, dim: int, capacity: int) -> NodeCache:
        """Open (creating it if needed) the cache of ``table`` of ``version``; capacity a power
        of two (``cache_capacity``). EmbeddingCacheError when it cannot be: no space, no
        permission, a file there of another layout, a CPU this cache is not safe on."""
        if dim < 1 or capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"need dim >= 1 and a power-of-two capacity, got {dim}, {capacity}")
        path = Path(directory) / file_name(version, table, dim, capacity)
        need = file_bytes(dim, capacity)
        machine = platform.machine().lower()
        if machine not in TSO_MACHINES:
            raise _cannot(path, need, f"lock-free reads are not safe on {machine} (not x86-64)")
        try:
            Path(directory).mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            lock_fd = _lock(lock_path(path))
        except OSError as exc:
            raise _cannot(path, need, _reason(exc)) from exc
        try:
            fd = _open_file(path, dim, capacity)
        except BaseException:
            os.close(lock_fd)
            raise
        # Our shared flock keeps the file; mapping it (all its pages: a while for gigabytes)
        # need not hold up the other processes' writes.
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        try:
            return cls(path, dim, capacity, fd, lock_fd)
        except OSError as exc:  # no address space or memory left to map it
            _close_unused(path, fd, _relock(lock_path(path), lock_fd))
            raise _cannot(path, need, _reason(exc)) from exc

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows float32 [n, dim], hit bool [n]) of ``ids`` (int64 [n]); a miss's row is
        undefined. Lock-free: a slot being written while we read it is a miss."""
        ids = np.asarray(ids, dtype=ID_DTYPE)
        seq, keys, rows = self._arrays()
        slots = ids & self._mask
        before = seq.take(slots)
        found = keys.take(slots)
        values = rows.take(slots)
        after = seq.take(slots)
        hit = _steady(before, after) & (found == ids)
        return values.view(ROW_DTYPE).reshape(*ids.shape, self.dim), hit

    def put(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Store ``rows`` (float32 [n, dim]) of ``ids`` (int64 [n], distinct). Of ids that
        share a slot the last one given wins; the slot's earlier id becomes a miss."""
        ids = np.asarray(ids, dtype=ID_DTYPE)
        rows = np.ascontiguousarray(rows, dtype=ROW_DTYPE)
        if ids.ndim != 1 or rows.shape != (len(ids), self.dim):
            raise ValueError(
                f"need ids [n] and rows [n, {self.dim}], got {ids.shape}, {rows.shape}"
            )
        if os.getpid() != self._pid:
            raise EmbeddingCacheError(f"{self.path} was opened before a fork; open it again")
        if len(ids) == 0:
            return
        slots = ids & self._mask
        if not np.array_equal(slots, ids):  # distinct ids in 0..capacity-1 share no slot
            ids, rows, slots = _last_per_slot(ids, rows, slots)
        with self._writing():
            seq, keys, values = self._arrays()
            begin = seq.take(slots) | 1  # odd; repairs a slot a dead writer left odd
            seq[slots] = begin
            keys[slots] = ids
            values[slots] = rows.view(self._rows.dtype).reshape(-1)
            seq[slots] = begin + 1

    def seed_from(self, other: NodeCache, forget: np.ndarray) -> int:
        """Fill this cache, if it is still empty, with what ``other`` (the same table of the
        version this one's patches, same layout) holds, less the ids in ``forget`` (the rows
        the new version changes): a delta starts warm. Read from ``other`` lock-free, as
        ``get`` does (a slot being written there is left out); written under this file's
        write lock, rows before sequence numbers, so a reader here sees a slot only once its
        row is in. Returns the rows copied (0: not empty, or another layout)."""
        if (other.dim, other.capacity) != (self.dim, self.capacity):
            return 0
        forget = np.asarray(forget, dtype=ID_DTYPE)
        copied = 0
        with self._writing():
            seq, keys, values = self._arrays()
            if np.count_nonzero(seq):  # another process seeded or filled it first
                return 0
            theirs = other._arrays()
            for start in range(0, self.capacity, STATS_CHUNK):
                part = slice(start, start + STATS_CHUNK)
                before = theirs[0][part].copy()
                their_keys = theirs[1][part].copy()
                their_rows = theirs[2][part].copy()
                after = theirs[0][part]
                valid = _steady(before, after)
                valid &= ~np.isin(their_keys, forget)
                keys[part] = their_keys
                values[part] = their_rows
                seq[part] = np.where(valid, 2, 0)
                copied += int(np.count_nonzero(valid))
        return copied

    def stats(self) -> dict[str, Any]:
        """What a status call shows; counting filled slots reads ``seq`` (8 bytes a slot)."""
        seq, _, _ = self._arrays()
        filled = 0
        for start in range(0, self.capacity, STATS_CHUNK):
            part = seq[start : start + STATS_CHUNK]
            filled += int(np.count_nonzero(_written(part)))
        return {
            "path": str(self.path),
            "dim": self.dim,
            "capacity": self.capacity,
            "bytes": file_bytes(self.dim, self.capacity),
            "filled": filled,
        }

    def close(self) -> None:
        """Stop using the file; the last user of it unlinks it. Idempotent."""
        with self._thread_lock:
            if self._closed:
                return
            self._closed = True
            self._unmap()
            if os.getpid() != self._pid:  # a forked child: the flocks are its parent's
                os.close(self._fd)
                os.close(self._lock_fd)
                return
            try:
                self._take_lock()
            except OSError as exc:
                logger.warning("cannot lock %s to close it: %s", self.path, _reason(exc))
                os.close(self._fd)  # drops our shared flock; the file is left for sweep
                os.close(self._lock_fd)
                return
            _close_unused(self.path, self._fd, self._lock_fd)

    def __enter__(self) -> NodeCache:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._closed:
            raise EmbeddingCacheError(f"{self.path} is closed")
        return self._seq, self._keys, self._rows

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """The file's write lock, between threads and processes."""
        with self._thread_lock:
            self._take_lock()
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _unmap(self) -> None:
        """Drop our views; the mapping goes now, or with the last copy a thread still holds."""
        empty = np.empty(0, SEQ_DTYPE)
        self._seq = self._keys = empty
        self._rows = np.empty(0, self._rows.dtype)
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None

    def _take_lock(self) -> None:
        self._lock_fd = _relock(lock_path(self.path), self._lock_fd)


def sweep(directory: Path) -> list[Path]:
    """Remove the cache files in ``directory`` that no process has open (left by processes
    that died); the files removed. A file that cannot be examined is left, with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            if _remove_unused(path):
                removed.append(path)
        except OSError as exc:
            logger.warning("cannot sweep the embedding cache %s: %s", path, _reason(exc))
    for lock in sorted(directory.glob(f"*{SUFFIX}{LOCK_SUFFIX}")):
        with contextlib.suppress(OSError):
            _remove_orphan_lock(lock)
    if removed:
        logger.info("removed %d unused embedding cache file(s) in %s", len(removed), directory)
    return removed


def _open_file(path: Path, dim: int, capacity: int) -> int:
    """The cache file, created or checked, with our shared flock on it (lock file held)."""
    need = file_bytes(dim, capacity)
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise _cannot(path, need, _reason(exc)) from exc
    try:
        _reserve(fd, path, need)
        _check_header(fd, path, dim, capacity)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reserve(fd: int, path: Path, need: int) -> None:
    """Allocate the whole file now, unless it already has its size; remove it if that fails."""
    size = os.fstat(fd).st_size
    if size == need:
        return
    if size > need or os.pread(fd, min(size, HEADER_BYTES), 0).strip(b"\0"):
        raise _cannot(path, need, f"the file there has {size} bytes, not {need}")
    try:
        os.posix_fallocate(fd, 0, need)
    except OSError as exc:
        if _unused(fd):  # nobody maps a file short of its size: ours to remove
            _unlink(path)
            _unlink(lock_path(path))
        raise _cannot(path, need, _reason(exc), _free(path.parent)) from exc


def _check_header(fd: int, path: Path, dim: int, capacity: int) -> None:
    """Write the header of a new (all-zero) file; refuse a file whose header differs."""
    header = MAGIC + np.array([dim, capacity], dtype="<i8").tobytes()
    found = os.pread(fd, HEADER_BYTES, 0)
    if not found.strip(b"\0"):
        os.pwrite(fd, header, 0)
    elif found[: len(header)] != header:
        raise _cannot(path, file_bytes(dim, capacity), f"its header is not {header!r}")


def _views(buffer: mmap.mmap, dim: int, capacity: int) -> tuple[np.ndarray, ...]:
    """seq, keys and rows of a mapped file; a row is one opaque item of ``dim`` floats (numpy
    copies those with one memcpy each, 2x faster than float by float on 50,000 rows)."""
    seq = np.frombuffer(buffer, SEQ_DTYPE, capacity, HEADER_BYTES)
    keys = np.frombuffer(buffer, ID_DTYPE, capacity, HEADER_BYTES + 8 * capacity)
    row = np.dtype((np.void, dim * ROW_DTYPE.itemsize))
    return seq, keys, np.frombuffer(buffer, row, capacity, HEADER_BYTES + 16 * capacity)


def _written(seq: np.ndarray) -> np.ndarray:
    """Slots holding a row: written (> 0) and no write under way (even)."""
    return (seq > 0) & ((seq & 1) == 0)


def _steady(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Slots read consistently: written, and unchanged between the reads before and after."""
    return (before == after) & _written(before)


def _last_per_slot(
    ids: np.ndarray, rows: np.ndarray, slots: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep, of the ids that share a slot, the last one given."""
    _, first_from_end = np.unique(slots[::-1], return_index=True)
    keep = len(slots) - 1 - first_from_end
    return ids[keep], rows[keep], slots[keep]


def _lock(path: Path) -> int:
    """A new fd of the lock file at ``path``, flock'd exclusively, and still the file that
    the path names: a lock file unlinked by its holder while we waited is left for the new
    one."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(path, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _relock(path: Path, fd: int) -> int:
    """``fd`` of the lock file at ``path`` flock'd exclusively again, or if that file was
    replaced (never while we hold its cache file open, unless someone deletes it by hand) a
    new fd of the one there now, ``fd`` closed."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    if _same_file(path, fd):
        return fd
    fresh = _lock(path)
    os.close(fd)
    return fresh


def _same_file(path: Path, fd: int) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _unused(fd: int) -> bool:
    """Whether no other open file holds a flock on this file (we then hold it exclusively)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _close_unused(path: Path, fd: int, lock_fd: int) -> None:
    """Close our fds of the cache file (dropping our shared flock) and of its lock file (held);
    unlink both first if nobody else holds the cache file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
        if _unused(fd) and _same_file(path, fd):
            _unlink(path)
            _unlink(lock_path(path))
            logger.info("removed the embedding cache %s (its last user closed it)", path)
    finally:
        os.close(fd)
        os.close(lock_fd)


def _remove_unused(path: Path) -> bool:
    """Unlink ``path`` and its lock file if no process has it open; whether it did."""
    lock_fd = _lock(lock_path(path))
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            if not (_unused(fd) and _same_file(path, fd)):
                return False
            _unlink(path)
            _unlink(lock_path(path))
            return True
        finally:
            os.close(fd)
    finally:
        os.close(lock_fd)


def _remove_orphan_lock(lock: Path) -> None:
    """Unlink a lock file whose cache file is gone (its remover died between the two)."""
    lock_fd = _lock(lock)
    try:
        if not lock.with_name(lock.name.removesuffix(LOCK_SUFFIX)).exists():
            _unlink(lock)
    finally:
        os.close(lock_fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))


def _free(directory: Path) -> str:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return ""
    return f"{stat.f_bavail * stat.f_frsize} bytes free there"


def _cannot(path: Path, need: int, reason: str, *more: str) -> EmbeddingCacheError:
    detail = "; ".join([reason, *[m for m in more if m]])
    return EmbeddingCacheError(
        f"cannot open the node's embedding cache {path} ({need} bytes): {detail}"
    )
