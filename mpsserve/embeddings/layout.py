"""Where each embedding row lives in the cluster.

A table of one version is split into ``buckets`` Redis hashes (as HugeCTR's HPS and
TensorFlow Recommenders-Addons partition theirs): an id goes to bucket ``id mod buckets``,
whose key is ``<prefix>:rows:<version>:<table>:<bucket>``; the hash's field is the id as
8 bytes little-endian int64 and its value the row as ``dim`` little-endian float32. The key
has no ``{hash tag}``, so Redis Cluster hashes all of it and the buckets of a table spread
over every shard; a lookup sends one HMGET per bucket it touches, pipelined per node.

The registry (which versions exist, complete or not, and which are pinned) is two keys that
share the hash tag ``{registry}``, so they live in one slot and change together.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mpsserve.errors import InvalidInput

#: Names of tables and version tags: no ':' (the key separator) and no '{' (a hash tag).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
ROW_DTYPE = np.dtype("<f4")
ID_DTYPE = np.dtype("<i8")
#: Redis Cluster's hash slots.
SLOTS = 16384
#: Rows per bucket a default bucket count aims at. A lookup costs one HMGET per bucket it
#: touches (the client's per-command work dominates: ~2000 one-field HMGETs took 140 ms on a
#: 2-core machine, ~300 took 15 ms), so fewer, larger buckets are cheaper to read; at least
#: MIN_BUCKETS keeps a table spread over the shards, and the cap on rows per bucket keeps
#: each hash small enough to move between shards (resharding moves a key whole).
ROWS_PER_BUCKET = 8192
MIN_BUCKETS, MAX_BUCKETS = 256, 1 << 20


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid table name or version tag; InvalidInput naming ``kind`` else."""
    if not NAME.match(name):
        raise InvalidInput(
            f"{kind} {name[:70]!r} must be 1-63 characters of A-Za-z0-9_.- starting with a "
            "letter or digit"
        )
    return name


def default_buckets(rows: int) -> int:
    """Buckets for a table of ``rows`` rows: about ROWS_PER_BUCKET rows each, within bounds."""
    return int(min(MAX_BUCKETS, max(MIN_BUCKETS, -(-rows // ROWS_PER_BUCKET))))


@dataclass(frozen=True)
class Layout:
    """The key names of one store (one ``key_prefix``)."""

    prefix: str

    def row_key(self, version: str, table: str, bucket: int) -> str:
        return f"{self.prefix}:rows:{version}:{table}:{bucket}"

    @property
    def versions_key(self) -> str:
        """Hash: version tag -> its record (JSON, ``registry.VersionRecord``)."""
        return f"{self.prefix}:{{registry}}:versions"

    @property
    def pins_key(self) -> str:
        """Set: the version tags in use, which ``delete`` refuses without force."""
        return f"{self.prefix}:{{registry}}:pins"

    @property
    def leases_key(self) -> str:
        """Hash: ``<version> <holder>`` -> expiry (unix seconds): the versions replicas
        serve now, renewed while they do (``EmbeddingStore.lease``); gc keeps them."""
        return f"{self.prefix}:{{registry}}:leases"

    def table_keys(self, version: str, table: str, buckets: int) -> Iterator[str]:
        return (self.row_key(version, table, b) for b in range(buckets))


def encode_ids(ids: np.ndarray) -> list[bytes]:
    """Each id as its 8-byte little-endian field name."""
    raw = np.ascontiguousarray(ids, dtype=ID_DTYPE).tobytes()
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


@dataclass(frozen=True)
class BucketGroup:
    """The ids of one lookup that fall in one bucket, and where they sit in the input."""

    bucket: int
    positions: np.ndarray  # indices into the ids given to ``group_by_bucket``


def group_by_bucket(ids: np.ndarray, buckets: int) -> list[BucketGroup]:
    """``ids`` (unique int64) grouped by bucket, buckets ascending (one HMGET each)."""
    if len(ids) == 0:
        return []
    owner = np.mod(ids, buckets)
    order = np.argsort(owner, kind="stable")
    starts = np.flatnonzero(np.diff(owner[order], prepend=-1))
    ends = [*starts[1:], len(order)]
    return [
        BucketGroup(int(owner[order[s]]), order[s:e]) for s, e in zip(starts, ends, strict=True)
    ]


def key_slot(key: str) -> int:
    """The cluster hash slot of ``key`` (CRC16 of its hash tag or of all of it, mod 16384)."""
    from redis.crc import key_slot as crc_slot

    return int(crc_slot(key.encode()))
