"""One look at the store for ``doctor`` and ``status``: reachable, cluster state, versions;
and at the node cache's directory for ``doctor``. Never raises: what is wrong is the answer."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mpsserve.config import EmbeddingsConfig
from mpsserve.embeddings.lookup import node_cache_dir
from mpsserve.embeddings.node_cache import cache_capacity, file_bytes
from mpsserve.embeddings.store import EmbeddingStore
from mpsserve.errors import MpsServeError


@dataclass
class StoreProbe:
    ok: bool
    detail: str
    nodes: dict[str, Any] = field(default_factory=dict)
    versions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe(config: EmbeddingsConfig) -> StoreProbe:
    """Connect, ask every node for its cluster state, read the registry; each part that
    fails says so in ``detail``."""
    try:
        with EmbeddingStore.connect(config) as store:
            health = store.health()
            versions, registry_error = _versions(store)
    except MpsServeError as exc:  # shown after an "embedding store:" label
        return StoreProbe(False, exc.message.removeprefix("embedding store "))
    nodes = health["nodes"]
    bad = {n: s["state"] for n, s in nodes.items() if s["state"] != "ok"}
    text = f"{len(nodes)} node(s), cluster_state " + (f"NOT ok on {bad}" if bad else "ok")
    if registry_error is not None:
        return StoreProbe(False, f"{text}; versions unreadable: {registry_error}", nodes)
    complete = [v["version"] for v in versions if v["state"] == "complete"]
    others = [f"{v['version']} ({v['state']})" for v in versions if v["state"] != "complete"]
    text += f"; {len(complete)} complete version(s) {complete}"
    text += f", unfinished: {others}" if others else ""
    return StoreProbe(health["ok"], text, nodes, versions)


def _versions(store: EmbeddingStore) -> tuple[list[dict[str, Any]], str | None]:
    try:
        pins = store.pins()
        return [r.to_dict(r.version in pins) for r in store.versions()], None
    except MpsServeError as exc:
        return [], exc.message.removeprefix("embedding store ")


def node_cache_room(config: EmbeddingsConfig, versions: list[dict[str, Any]]) -> tuple[bool, str]:
    """Whether this node's cache directory can hold the node cache of the store's largest
    full version twice (an update holds two versions' caches for a moment); the text says
    where, what is free and what is needed."""
    if config.node_cache_rows == 0:
        return True, "off (embeddings.node_cache_rows is 0)"
    need = max(
        (_cache_bytes(config, v["tables"]) for v in versions if not v.get("base")), default=0
    )
    directory = node_cache_dir(config)
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK):
        return False, f"{existing} is not writable: the replicas would serve without it"
    stat = os.statvfs(existing)
    free = stat.f_bavail * stat.f_frsize
    text = (
        f"{directory}: {free / 2**20:,.0f} MiB free, the largest version needs "
        f"{need / 2**20:,.0f} MiB"
    )
    if free < 2 * need:
        return (
            False,
            text + " (twice that during an update): raise its size or lower node_cache_rows",
        )
    return True, text


def _cache_bytes(config: EmbeddingsConfig, tables: dict[str, Any]) -> int:
    return sum(
        file_bytes(t["dim"], cache_capacity(t["rows"], config.node_cache_rows))
        for t in tables.values()
    )
