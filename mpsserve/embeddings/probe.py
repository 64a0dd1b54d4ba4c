"""One look at the store for ``doctor`` and ``status``: reachable, cluster state, versions.
Never raises: what is wrong is the answer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mpsserve.config import EmbeddingsConfig
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
    """Connect, ask every node for its cluster state, read the registry."""
    try:
        with EmbeddingStore.connect(config) as store:
            health = store.health()
            pins = store.pins()
            versions = [r.to_dict(r.version in pins) for r in store.versions()]
    except MpsServeError as exc:
        return StoreProbe(False, exc.message)
    nodes = health["nodes"]
    bad = {n: s["state"] for n, s in nodes.items() if s["state"] != "ok"}
    complete = [v["version"] for v in versions if v["state"] == "complete"]
    others = [f"{v['version']} ({v['state']})" for v in versions if v["state"] != "complete"]
    text = (
        f"{len(nodes)} node(s), cluster_state "
        + (f"NOT ok on {bad}" if bad else "ok")
        + f"; {len(complete)} complete version(s) {complete}"
        + (f", unfinished: {others}" if others else "")
    )
    return StoreProbe(health["ok"], text, nodes, versions)
