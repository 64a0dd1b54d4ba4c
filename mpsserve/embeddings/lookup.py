"""Embedding rows for split models' requests: distinct ids, the node's shared cache, the store.

A model replica holds one ``EmbeddingTier`` (one connection pool to the store for the process)
and, per loaded model version, one ``EmbeddingLookup`` bound to the embedding version that
model version was trained with: every row it returns comes from that version, so a request
never mixes two versions, and a new version's rows are never confused with an old one's (the
node cache keeps one file per version and table, ``node_cache``).

A lookup of one table: the request's ids are de-duplicated, the node cache answers what it
holds, the misses are fetched from the store in one pipelined round trip per shard, and put in
the node cache for every replica on the node. Runs on the replica's inference threads (it
blocks on the network), never on an event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from mpsserve.config import EmbeddingsConfig
from mpsserve.embeddings.layout import ID_DTYPE
from mpsserve.embeddings.node_cache import NodeCache, cache_capacity, sweep
from mpsserve.embeddings.registry import TableInfo, VersionRecord
from mpsserve.embeddings.store import EmbeddingStore
from mpsserve.errors import EmbeddingCacheError, EmbeddingStoreError

logger = logging.getLogger(__name__)

#: Per table: (distinct ids requested, node-cache hits, fetched from the store).
Counts = tuple[int, int, int]


class RowSource(Protocol):
    """What a lookup needs of the store (``EmbeddingStore``)."""

    def require(
        self, version: str, dims: Mapping[str, int | None] | None = None
    ) -> VersionRecord: ...

    def fetch(self, version: str, table: str, unique: np.ndarray) -> np.ndarray: ...

    def dims(self, version: str) -> dict[str, int]: ...


class EmbeddingLookup:
    """The tables of one embedding version, for one process: ``rows`` by id."""

    def __init__(
        self, source: RowSource, record: VersionRecord, caches: Mapping[str, NodeCache]
    ) -> None:
        self.source = source
        self.record = record
        self.version = record.version
        self.caches = dict(caches)
        self.cache_problem: str | None = None  # why a table has no node cache, if one has not
        self.dims = source.dims(record.version)  # every table's dim (a delta's: its chain's)
        #: Called once when closed (the tier's lease bookkeeping).
        self.on_close: Callable[[EmbeddingLookup], None] = lambda lookup: None
        self._users = 0  # requests using it now (``using``)
        self._retired = False  # replaced by a newer version: closed once no request uses it
        self._closed = False
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def using(self) -> Iterator[EmbeddingLookup]:
        """Hold this lookup for one request: ``retire`` closes it only after the request."""
        with self._lock:
            self._users += 1
        try:
            yield self
        finally:
            with self._lock:
                self._users -= 1
                last = self._retired and self._users == 0
            if last:
                self.close()

    def retire(self) -> None:
        """Close now if no request uses it, else when the last one ends."""
        with self._lock:
            self._retired = True
            idle = self._users == 0
        if idle:
            self.close()

    def rows(self, table: str, ids: np.ndarray) -> tuple[np.ndarray, Counts]:
        """The rows of ``ids`` (any shape) as float32 [*ids.shape, dim], and the counts."""
        flat = np.asarray(ids, dtype=ID_DTYPE).reshape(-1)
        unique, inverse = np.unique(flat, return_inverse=True)
        found, hits, fetched = self._unique_rows(table, unique)
        dim = found.shape[1]
        return found[inverse].reshape(*np.shape(ids), dim), (len(unique), hits, fetched)

    def _unique_rows(self, table: str, unique: np.ndarray) -> tuple[np.ndarray, int, int]:
        cache = self.caches.get(table)
        if cache is None:
            return self.source.fetch(self.version, table, unique), 0, len(unique)
        found, hit = cache.get(unique)
        missing = np.flatnonzero(~hit)
        if len(missing):
            fetched = self.source.fetch(self.version, table, unique[missing])
            found[missing] = fetched
            cache.put(unique[missing], fetched)
        return found, len(unique) - len(missing), len(missing)

    def stats(self) -> dict[str, object]:
        """What ``status`` shows: the version, and each table's node cache."""
        return {
            "version": self.version,
            "node_cache": {table: cache.stats() for table, cache in self.caches.items()},
            "node_cache_problem": self.cache_problem,
        }

    def close(self) -> None:
        """Let go of the node cache's files (the last process on the node removes them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for cache in self.caches.values():
            cache.close()
        self.caches.clear()
        self.on_close(self)


class EmbeddingTier:
    """This process's way to the embedding tier: one store connection (made on first use,
    shared by every version's lookup) and the node cache's directory."""

    def __init__(self, config: EmbeddingsConfig, min_lease_ttl_s: float = 0.0) -> None:
        self.config = config
        self.cache_dir = node_cache_dir(config)
        # its name in leases: the process, and which tier of it
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{next(_TIERS)}"
        self.lease_ttl_s = max(config.lease_ttl_s, min_lease_ttl_s)
        self._store: EmbeddingStore | None = None
        self._lock = threading.Lock()
        self._swept = False
        self._active: dict[int, list[str]] = {}  # open lookups (by id): their chains' tags

    def store(self) -> EmbeddingStore:
        with self._lock:
            if self._store is None:
                self._store = EmbeddingStore.connect(self.config)
            return self._store

    def lookup(
        self,
        version: str,
        dims: Mapping[str, int | None],
        previous: EmbeddingLookup | None = None,
    ) -> EmbeddingLookup:
        """A lookup of ``version``, which must be complete in the store and hold each table
        of ``dims`` at that dimension (None: any); EmbeddingVersionMissing or
        EmbeddingDataError if not."""
        store = self.store()
        record = store.require(version, dims)
        chain = store.chain(version)
        full = chain[-1].tables  # a delta's tables are its chain's
        lookup = EmbeddingLookup(store, record, {})
        store.lease([r.version for r in chain], self.holder, self.lease_ttl_s)
        with self._lock:
            self._active[id(lookup)] = [r.version for r in chain]
        lookup.on_close = self._closed
        if self.config.node_cache_rows == 0:
            return lookup
        try:
            self._open_caches(lookup, {table: full[table] for table in dims}, previous)
        except BaseException:  # a store error while seeding: let go of what it holds
            lookup.close()
            raise
        return lookup

    def _open_caches(
        self,
        lookup: EmbeddingLookup,
        tables: Mapping[str, TableInfo],
        previous: EmbeddingLookup | None,
    ) -> None:
        """Each table's node cache (none where it cannot be opened: ``cache_problem``), a
        delta's seeded from ``previous`` when that is its base."""
        self._sweep_once()
        version = lookup.version
        for table, info in tables.items():
            capacity = cache_capacity(info.rows, self.config.node_cache_rows)
            try:
                cache = NodeCache.open(self.cache_dir, version, table, info.dim, capacity)
            except EmbeddingCacheError as exc:
                lookup.cache_problem = exc.message
                logger.warning(
                    "embedding version %s: no node cache for %s: %s", version, table, exc
                )
                continue
            lookup.caches[table] = cache
            if previous is not None and lookup.record.base == previous.version:
                self._seed(cache, previous, version, table)

    def _seed(self, cache: NodeCache, previous: EmbeddingLookup, version: str, table: str) -> None:
        """A delta's node cache starts as its base's, less the rows the delta changes."""
        old = previous.caches.get(table)
        if old is None:
            return
        changed = self.store().changed_ids(version, table)
        try:
            copied = cache.seed_from(old, changed)
        except EmbeddingCacheError as exc:  # the base's cache closed meanwhile
            logger.warning("node cache of %s %s not seeded: %s", version, table, exc)
            return
        if copied:
            logger.info(
                "node cache of %s %s: %d rows from %s, %d changed ids left out",
                version, table, copied, previous.version, len(changed),
            )  # fmt: skip

    def renew(self) -> None:
        """Renew the leases on every version an open lookup uses (and its chain)."""
        with self._lock:
            tags = sorted({tag for chain in self._active.values() for tag in chain})
        self.store().lease(tags, self.holder, self.lease_ttl_s)

    def _closed(self, lookup: EmbeddingLookup) -> None:
        """A lookup closed: release the versions no other open lookup uses."""
        with self._lock:
            chain = self._active.pop(id(lookup), [])
            still = {tag for tags in self._active.values() for tag in tags}
            store = self._store
        gone = [tag for tag in chain if tag not in still]
        if store is None or not gone:
            return
        try:
            store.release(gone, self.holder)
        except EmbeddingStoreError as exc:  # they expire on their own
            logger.warning("cannot release leases on %s: %s", ", ".join(gone), exc.message)

    def _sweep_once(self) -> None:
        """Remove the node cache files that processes which died left behind, once."""
        with self._lock:
            if self._swept:
                return
            self._swept = True
        try:
            removed = sweep(self.cache_dir)
        except OSError as exc:
            logger.warning("cannot sweep the node cache %s: %s", self.cache_dir, exc)
            return
        if removed:
            logger.info("node cache: removed %d file(s) nobody uses", len(removed))

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


_TIERS = itertools.count(1)


def node_cache_dir(config: EmbeddingsConfig) -> Path:
    """The node cache's directory for this store: ``node_cache_dir``/<store id>, the id a
    digest of the store's nodes and key prefix, so that two stores never share files."""
    digest = hashlib.sha256(
        "\n".join([config.key_prefix, *sorted(config.nodes)]).encode()
    ).hexdigest()
    return Path(config.node_cache_dir) / f"{config.key_prefix}-{digest[:12]}"
