"""The embedding store's client: publish, look up, list and delete versions in a Redis Cluster.

Synchronous on purpose: publishing is a command-line job, and lookups will run on a replica's
inference thread, never on an event loop. Every redis error leaves this module as an
``EmbeddingStoreError`` naming the store's nodes and what was being done (never a secret);
each node has ``connect_timeout_s`` to accept a connection and ``command_timeout_s`` to answer,
and a failed command is retried ``retries`` times after a topology refresh, so a dead shard
fails a call within a bounded time instead of hanging it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mpsserve.config import EmbeddingsConfig
from mpsserve.embeddings.layout import (
    ID_DTYPE,
    ROW_DTYPE,
    Layout,
    check_name,
    default_buckets,
    encode_ids,
    group_by_bucket,
)
from mpsserve.embeddings.registry import TableInfo, VersionRecord
from mpsserve.errors import (
    EmbeddingDataError,
    EmbeddingStoreError,
    EmbeddingVersionMissing,
    MpsServeError,
)
from mpsserve.text import bound_message

logger = logging.getLogger(__name__)

#: publish's progress callback: (table, rows written so far, rows of the table).
Progress = Callable[[str, int, int], None]
#: Keys unlinked per pipelined round trip when deleting a version.
DELETE_BATCH = 1000
#: The longest chain of deltas (a lookup of a miss reads each level in turn).
MAX_CHAIN = 32


@dataclass(frozen=True)
class Table:
    """One table to publish: ``rows`` [n, dim] float32; ``ids`` [n] (default 0..n-1)."""

    rows: np.ndarray
    ids: np.ndarray | None = None

    def checked(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids as int64, rows as contiguous little-endian float32), or EmbeddingDataError."""
        if self.rows.ndim != 2 or self.rows.shape[1] < 1:
            raise EmbeddingDataError(f"table {name}: rows must be [n, dim], got {self.rows.shape}")
        ids = np.arange(len(self.rows), dtype=ID_DTYPE) if self.ids is None else self.ids
        ids = np.asarray(ids).astype(ID_DTYPE, casting="same_kind")
        if ids.shape != (len(self.rows),):
            raise EmbeddingDataError(f"table {name}: {ids.shape} ids for {len(self.rows)} rows")
        if len(np.unique(ids)) != len(ids):
            raise EmbeddingDataError(f"table {name}: ids repeat")
        return ids, np.ascontiguousarray(self.rows, dtype=ROW_DTYPE)


def _client(config: EmbeddingsConfig) -> Any:
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    addresses = [node.rsplit(":", 1) for node in config.nodes]
    return RedisCluster(
        startup_nodes=[ClusterNode(host.strip("[]"), int(port)) for host, port in addresses],
        username=config.username,
        password=config.password(),
        socket_connect_timeout=config.connect_timeout_s,
        socket_timeout=config.command_timeout_s,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), config.retries),
        require_full_coverage=True,
    )


class EmbeddingStore:
    """One connection pool to the cluster (per node), and the registry's view of versions."""

    def __init__(self, config: EmbeddingsConfig, client: Any) -> None:
        self.config = config
        self.layout = Layout(config.key_prefix)
        self._client = client
        self._complete: dict[str, VersionRecord] = {}  # complete records never change

    @classmethod
    def connect(cls, config: EmbeddingsConfig) -> EmbeddingStore:
        """Connect and learn the cluster's slots; EmbeddingStoreError if no node answers."""
        with _talking(config, "connecting"):
            return cls(config, _client(config))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- registry ------------------------------------------------------------------------

    def versions(self) -> list[VersionRecord]:
        """Every version the registry holds, oldest first, complete or not."""
        with _talking(self.config, "listing versions"):
            raw = self._client.hgetall(self.layout.versions_key)
        records = [VersionRecord.from_json(v) for v in raw.values()]
        return sorted(records, key=lambda r: (r.created, r.version))

    def record(self, version: str) -> VersionRecord | None:
        with _talking(self.config, f"reading version {version}"):
            raw = self._client.hget(self.layout.versions_key, version)
        return None if raw is None else VersionRecord.from_json(raw)

    def pins(self) -> set[str]:
        with _talking(self.config, "reading pins"):
            return {p.decode() for p in self._client.smembers(self.layout.pins_key)}

    def pin(self, version: str, pinned: bool = True) -> None:
        """Mark ``version`` in use (``delete`` then refuses it without force), or not."""
        if pinned and self.record(version) is None:
            raise EmbeddingVersionMissing(f"no embedding version {version!r} to pin")
        with _talking(self.config, f"pinning {version}"):
            change = self._client.sadd if pinned else self._client.srem
            change(self.layout.pins_key, version)

    # -- leases and garbage collection ----------------------------------------------------

    def lease(self, versions: Sequence[str], holder: str, ttl_s: float) -> None:
        """``holder`` (a replica) uses ``versions`` for the next ``ttl_s`` seconds (renewed
        while it does); ``gc`` and ``delete`` keep a leased version."""
        if not versions:
            return
        expiry = str(time.time() + ttl_s)
        with _talking(self.config, "renewing leases"):
            self._client.hset(
                self.layout.leases_key, mapping={f"{v} {holder}": expiry for v in versions}
            )

    def release(self, versions: Sequence[str], holder: str) -> None:
        """``holder`` no longer uses ``versions``."""
        if versions:
            with _talking(self.config, "releasing leases"):
                self._client.hdel(self.layout.leases_key, *[f"{v} {holder}" for v in versions])

    def leases(self) -> dict[str, list[str]]:
        """Version -> the holders whose lease has not expired; expired ones are removed."""
        with _talking(self.config, "reading leases"):
            raw = self._client.hgetall(self.layout.leases_key)
        now, expired = time.time(), []
        held: dict[str, list[str]] = {}
        for field, expiry in raw.items():
            version, _, holder = field.decode().partition(" ")
            if float(expiry) < now:
                expired.append(field)
            else:
                held.setdefault(version, []).append(holder)
        if expired:
            with _talking(self.config, "removing expired leases"):
                self._client.hdel(self.layout.leases_key, *expired)
        return {v: sorted(h) for v, h in sorted(held.items())}

    def collectable(self, keep: int) -> list[VersionRecord]:
        """Complete versions ``gc`` would delete, deltas before their bases: all but the
        ``keep`` newest, less those pinned or leased and every version their chains need."""
        records = self.versions()
        by_tag = {r.version: r for r in records}
        complete = [r for r in records if r.complete]
        needed = {r.version for r in complete[len(complete) - keep :]} if keep > 0 else set()
        needed |= self.pins() | set(self.leases())
        needed |= {r.version for r in records if not r.complete}  # their bases stay too
        for tag in list(needed):
            if tag in by_tag:
                needed.update(_bases(by_tag[tag], by_tag))
        doomed = [r for r in complete if r.version not in needed]
        depth = {r.version: len(_bases(r, by_tag)) for r in doomed}
        return sorted(doomed, key=lambda r: -depth[r.version])

    def _put(self, record: VersionRecord) -> None:
        with _talking(self.config, f"recording version {record.version}"):
            self._client.hset(self.layout.versions_key, record.version, record.to_json())

    # -- publish -------------------------------------------------------------------------

    def publish(
        self,
        version: str,
        tables: Mapping[str, Table],
        progress: Progress | None = None,
        buckets: int | None = None,
        base: str | None = None,
    ) -> VersionRecord:
        """Write every table's rows under ``version``, then mark it complete: until then no
        lookup uses it, so a publish that fails half way is never served. Publishing an
        incomplete version again overwrites its rows (a resume); a complete one is refused.
        ``base``: ``version`` is a delta of that complete version, ``tables`` its changed rows
        (each table one of the base's, at its dim)."""
        check_name("version", version)
        checked = {check_name("table", n): t.checked(n) for n, t in tables.items()}
        infos = {
            name: TableInfo(len(ids), rows.shape[1], buckets or default_buckets(len(ids)))
            for name, (ids, rows) in checked.items()
        }
        if base is not None:
            self._check_delta(version, base, infos)
        record = self._begin(version, infos, base)
        for name, (ids, rows) in checked.items():
            self._write_table(version, name, infos[name], ids, rows, progress)
        self._verify(record)
        done = replace(record, state="complete", completed=time.time())
        self._put(done)
        return done

    def _check_delta(self, version: str, base: str, infos: dict[str, TableInfo]) -> None:
        """A delta's tables are its base's, at their dims; the chain stays within bounds."""
        chain = self.chain(base)
        if len(chain) >= MAX_CHAIN:
            raise EmbeddingDataError(
                f"embedding version {base!r} is the end of a chain of {len(chain)} versions; "
                f"a delta of it would pass {MAX_CHAIN}: publish a full version instead"
            )
        full = chain[-1].tables
        for name, info in infos.items():
            if name not in full:
                raise EmbeddingDataError(
                    f"delta {version}: table {name} is not in base {base!r} "
                    f"(its tables: {sorted(full)})"
                )
            if info.dim != full[name].dim:
                raise EmbeddingDataError(
                    f"delta {version}: table {name} has dim {info.dim}, its base {full[name].dim}"
                )

    def _begin(
        self, version: str, infos: dict[str, TableInfo], base: str | None = None
    ) -> VersionRecord:
        existing = self.record(version)
        if existing is not None and existing.state != "publishing":
            raise EmbeddingDataError(
                f"embedding version {version!r} already exists ({existing.state}); delete it "
                "first or publish under a new tag"
            )
        if existing is not None and (existing.tables != infos or existing.base != base):
            raise EmbeddingDataError(
                f"embedding version {version!r} was begun with other tables, sizes or base; "
                "delete it first or publish under a new tag"
            )
        record = existing or VersionRecord(version, infos, base=base)
        self._put(record)
        return record

    def _write_table(
        self,
        version: str,
        name: str,
        info: TableInfo,
        ids: np.ndarray,
        rows: np.ndarray,
        progress: Progress | None,
    ) -> None:
        """Rows in bucket order, ``batch_rows`` per pipelined round trip, so that each round
        trip sets many fields of few hashes."""
        order = np.argsort(np.mod(ids, info.buckets), kind="stable")
        batch = self.config.batch_rows
        if progress is not None:
            progress(name, 0, len(order))
        for start in range(0, len(order), batch):
            chosen = order[start : start + batch]
            self._write_batch(version, name, info, ids[chosen], rows[chosen])
            if progress is not None:
                progress(name, min(start + batch, len(order)), len(order))

    def _write_batch(
        self, version: str, name: str, info: TableInfo, ids: np.ndarray, rows: np.ndarray
    ) -> None:
        pipe = self._client.pipeline(transaction=False)
        width = info.dim * ROW_DTYPE.itemsize
        for group in group_by_bucket(ids, info.buckets):
            raw = rows[group.positions].tobytes()
            values = [raw[i : i + width] for i in range(0, len(raw), width)]
            fields = encode_ids(ids[group.positions])
            key = self.layout.row_key(version, name, group.bucket)
            pipe.hset(key, mapping=dict(zip(fields, values, strict=True)))
        with _talking(self.config, f"writing {name} of version {version}"):
            pipe.execute()

    def _verify(self, record: VersionRecord) -> None:
        """Every table holds exactly its rows (a resumed publish of other ids would not)."""
        for name, info in record.tables.items():
            keys = list(self.layout.table_keys(record.version, name, info.buckets))
            found = sum(self._per_key("hlen", keys, f"counting {name}"))
            if found != info.rows:
                raise EmbeddingDataError(
                    f"table {name} of version {record.version} holds {found} rows, "
                    f"{info.rows} were published; the version stays incomplete"
                )

    def _per_key(self, command: str, keys: Sequence[str], what: str) -> list[Any]:
        """``command`` on each key, pipelined DELETE_BATCH keys per round trip."""
        answers: list[Any] = []
        for start in range(0, len(keys), DELETE_BATCH):
            pipe = self._client.pipeline(transaction=False)
            for key in keys[start : start + DELETE_BATCH]:
                getattr(pipe, command)(key)
            with _talking(self.config, what):
                answers += pipe.execute()
        return answers

    # -- delete --------------------------------------------------------------------------

    def delete(self, version: str, force: bool = False) -> int:
        """Remove a version's rows and record; refused for a pinned one unless ``force``.
        The record is marked ``deleting`` first, so nobody starts using it meanwhile.
        Returns the number of row hashes removed."""
        record = self.record(version)
        if record is None:
            raise EmbeddingVersionMissing(f"no embedding version {version!r} to delete")
        if version in self.pins() and not force:
            raise EmbeddingDataError(
                f"embedding version {version!r} is pinned (in use); unpin it or pass --force"
            )
        holders = self.leases().get(version)
        if holders and not force:
            raise EmbeddingDataError(
                f"embedding version {version!r} is served now by {len(holders)} replica(s) "
                f"({', '.join(holders[:3])}); pass --force to delete it anyway"
            )
        deltas = sorted(r.version for r in self.versions() if r.base == version)
        if deltas:
            raise EmbeddingDataError(
                f"embedding version {version!r} is the base of {', '.join(deltas)}; delete "
                "those first"
            )
        self._put(replace(record, state="deleting"))
        self._complete.pop(version, None)
        keys = [
            key
            for name, info in record.tables.items()
            for key in self.layout.table_keys(version, name, info.buckets)
        ]
        removed = sum(self._per_key("unlink", keys, f"deleting version {version}"))
        with _talking(self.config, f"forgetting version {version}"):
            self._client.hdel(self.layout.versions_key, version)
            self._client.srem(self.layout.pins_key, version)
        return int(removed)

    # -- lookup --------------------------------------------------------------------------

    def require(self, version: str, dims: Mapping[str, int | None] | None = None) -> VersionRecord:
        """The complete ``version``, holding each table of ``dims`` at that dimension (None:
        any; a delta's tables are its chain's); EmbeddingVersionMissing or EmbeddingDataError
        otherwise (what a model checks at load)."""
        chain = self.chain(version)
        full = chain[-1].tables
        for table, dim in (dims or {}).items():
            info = full.get(table)
            if info is None:
                raise EmbeddingVersionMissing(f"embedding version {version!r} has no table {table}")
            if dim is not None and info.dim != dim:
                raise EmbeddingDataError(
                    f"table {table} of embedding version {version!r} has dim {info.dim}, "
                    f"expected {dim}"
                )
        return chain[0]

    def chain(self, version: str) -> list[VersionRecord]:
        """``version``'s record, then its base's, down to a full version; each complete
        (EmbeddingVersionMissing otherwise). Complete records never change: cached."""
        chain: list[VersionRecord] = []
        tag: str | None = version
        while tag is not None:
            if len(chain) > MAX_CHAIN:
                raise EmbeddingDataError(f"embedding version {version!r}: a chain of deltas loops")
            record = self._complete.get(tag) or self.record(tag)
            if record is None:
                raise EmbeddingVersionMissing(f"no embedding version {tag!r} in the store")
            if not record.complete:
                raise EmbeddingVersionMissing(
                    f"embedding version {tag!r} is {record.state}, not complete"
                )
            self._complete[tag] = record
            chain.append(record)
            tag = record.base
        return chain

    def dims(self, version: str) -> dict[str, int]:
        """Each table's dim, as the chain's full version has it."""
        return {name: info.dim for name, info in self.chain(version)[-1].tables.items()}

    def lookup(self, version: str, table: str, ids: np.ndarray) -> np.ndarray:
        """The rows of ``ids`` (any shape) as float32 [*ids.shape, dim], each distinct id
        fetched once (``fetch``)."""
        ids = np.asarray(ids, dtype=ID_DTYPE)
        unique, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        found = self.fetch(version, table, unique)
        return found[inverse].reshape(*ids.shape, found.shape[1])

    def fetch(self, version: str, table: str, unique: np.ndarray) -> np.ndarray:
        """The rows of the distinct ``unique`` ids as float32 [n, dim]: one HMGET per bucket,
        pipelined per node; for a delta, the ids it does not hold from its base, and so on
        down the chain. An id missing from the full version is an EmbeddingDataError (its
        tables are complete by construction)."""
        chain = self.chain(version)
        dim = self._dim(chain, version, table)
        found = np.empty((len(unique), dim), dtype=ROW_DTYPE)
        wanted = np.arange(len(unique))
        for record in chain:
            info = record.tables.get(table)
            if info is None:
                continue
            last = record is chain[-1]
            hit = self._fetch_level(record.version, table, info, unique[wanted], last)
            found[wanted[hit.positions]] = hit.rows
            wanted = np.delete(wanted, hit.positions)
            if len(wanted) == 0:
                break
        return found

    def _fetch_level(
        self, version: str, table: str, info: TableInfo, ids: np.ndarray, last: bool
    ) -> _Found:
        """The rows of ``ids`` one version holds; at the chain's end, every id must be there."""
        groups = group_by_bucket(ids, info.buckets)
        pipe = self._client.pipeline(transaction=False)
        for group in groups:
            pipe.hmget(
                self.layout.row_key(version, table, group.bucket), encode_ids(ids[group.positions])
            )
        with _talking(self.config, f"looking up {len(ids)} ids in {table}"):
            answers = pipe.execute() if groups else []
        positions: list[np.ndarray] = []
        rows: list[np.ndarray] = []
        for group, values in zip(groups, answers, strict=True):
            have = np.array([v is not None for v in values], dtype=bool)
            if last and not have.all():
                missing = ids[group.positions[~have]]
                raise EmbeddingDataError(
                    f"{len(missing)} id(s) not in table {table}, e.g. {missing[:3].tolist()}"
                )
            present = [v for v in values if v is not None]
            if present:
                positions.append(group.positions[have])
                rows.append(_rows(present, info.dim, table))
        if not positions:
            return _Found(np.empty(0, dtype=np.int64), np.empty((0, info.dim), dtype=ROW_DTYPE))
        return _Found(np.concatenate(positions), np.concatenate(rows))

    def changed_ids(self, version: str, table: str) -> np.ndarray:
        """The ids whose rows the delta ``version`` changes in ``table`` (none for a table it
        does not hold): what a cache of its base must forget."""
        info = self.chain(version)[0].tables.get(table)
        if info is None:
            return np.empty(0, dtype=ID_DTYPE)
        keys = list(self.layout.table_keys(version, table, info.buckets))
        fields = self._per_key("hkeys", keys, f"listing the ids of {table} in {version}")
        raw = b"".join(f for bucket in fields for f in bucket)
        return np.frombuffer(raw, dtype=ID_DTYPE).copy()

    def newest_descendant(self, version: str) -> str | None:
        """The newest complete version whose chain passes through ``version`` (the updates
        published on top of it), None if there is none newer than it."""
        records = {r.version: r for r in self.versions()}
        best: VersionRecord | None = None
        for record in records.values():
            if not record.complete or record.version == version:
                continue
            if version in _bases(record, records) and (
                best is None or (record.created, record.version) > (best.created, best.version)
            ):
                best = record
        return None if best is None else best.version

    @staticmethod
    def _dim(chain: list[VersionRecord], version: str, table: str) -> int:
        info = chain[-1].tables.get(table)
        if info is None:
            raise EmbeddingVersionMissing(f"embedding version {version!r} has no table {table}")
        return info.dim

    # -- health --------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What doctor and status show: each known node's cluster state as it says, or why
        it does not answer; ok when every node answers ``cluster_state:ok``."""
        nodes = {node.name: self._node_state(node) for node in self._client.get_nodes()}
        ok = bool(nodes) and all(n["state"] == "ok" for n in nodes.values())
        return {"ok": ok, "nodes": nodes}

    def _node_state(self, node: Any) -> dict[str, Any]:
        from redis.exceptions import RedisError

        try:
            info = self._client.cluster_info(target_nodes=node)
        except (RedisError, OSError) as exc:
            return {"state": "unreachable", "role": node.server_type, "error": str(exc)[:200]}
        return {
            "state": info.get("cluster_state"),
            "role": node.server_type,
            "slots_ok": int(info.get("cluster_slots_ok", 0)),
            "known_nodes": int(info.get("cluster_known_nodes", 0)),
        }


@dataclass(frozen=True)
class _Found:
    positions: np.ndarray  # indices into the ids asked of one version
    rows: np.ndarray


def _rows(values: Sequence[bytes], dim: int, table: str) -> np.ndarray:
    raw = b"".join(values)
    if len(raw) != len(values) * dim * ROW_DTYPE.itemsize:
        raise EmbeddingDataError(f"rows of table {table} in the store are not {dim} float32")
    return np.frombuffer(raw, dtype=ROW_DTYPE).reshape(len(values), dim)


def _bases(record: VersionRecord, records: Mapping[str, VersionRecord]) -> list[str]:
    """``record``'s bases, nearest first, as far as ``records`` knows them."""
    bases: list[str] = []
    while record.base is not None and len(bases) <= MAX_CHAIN:
        bases.append(record.base)
        parent = records.get(record.base)
        if parent is None:
            break
        record = parent
    return bases


@contextlib.contextmanager
def _talking(config: EmbeddingsConfig, what: str) -> Iterator[None]:
    """Translate redis's errors into EmbeddingStoreError naming the store and ``what``."""
    from redis.exceptions import AuthenticationError, RedisClusterException, RedisError

    where = ", ".join(config.nodes[:3]) + (" ..." if len(config.nodes) > 3 else "")
    try:
        yield
    except MpsServeError:
        raise
    except (RedisError, RedisClusterException, OSError) as exc:
        detail = bound_message(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, AuthenticationError) or any(m in str(exc) for m in _AUTH_REFUSED):
            raise EmbeddingStoreError(
                f"embedding store {where} refused the credentials (embeddings.username, "
                f"password_env / password_file) while {what}: {detail}"
            ) from exc
        raise EmbeddingStoreError(f"embedding store {where}: {what} failed: {detail}") from exc


#: What Redis answers a connection without the right credentials (the cluster client
#: wraps some of them in a RedisClusterException).
_AUTH_REFUSED = ("username-password", "NOAUTH", "client already authenticated", "WRONGPASS")
