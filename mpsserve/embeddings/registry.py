"""What the store says about each version: its tables (rows, dim, buckets), when it was
created, and whether it is complete. Rows are written before a version is marked complete,
and a lookup refuses an incomplete version, so a half-published (or half-deleted) version is
never served.

A version may be a **delta**: ``base`` names the version it patches, and its tables hold only
the rows that changed (a table it does not list is its base's). A lookup of a delta reads the
delta first and its base for the rest, down the chain to a full version."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

State = Literal["publishing", "complete", "deleting"]


@dataclass(frozen=True)
class TableInfo:
    rows: int
    dim: int
    buckets: int


@dataclass(frozen=True)
class VersionRecord:
    version: str
    tables: dict[str, TableInfo]
    state: State = "publishing"
    created: float = field(default_factory=time.time)
    completed: float | None = None
    base: str | None = None  # the version this delta patches; None: a full version

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> VersionRecord:
        data: dict[str, Any] = json.loads(text)
        tables = {name: TableInfo(**info) for name, info in data.pop("tables").items()}
        return cls(tables=tables, **data)

    def to_dict(self, pinned: bool = False) -> dict[str, Any]:
        """How ``mpsserve embeddings list --json`` and ``status`` show it."""
        return {**asdict(self), "rows": self.rows, "pinned": pinned}
