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
