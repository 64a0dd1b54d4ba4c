"""``mpsserve embeddings``: publish a model's embedding tables into the store, list, pin
and delete versions. The store is the config's ``embeddings`` section (docs/embeddings.md).

Where tables come from (``--model-dir``): an ``.npz`` file, or a directory holding
``embeddings.npz``: each 2-D array is a table by its name, rows ids 0..n-1, unless an array
``<name>__ids`` gives their ids; or a demo model's version directory (its ``demo.json``
names the seed and sizes, from which the tables are made again, bit for bit).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpsserve.config import EmbeddingsConfig, ServiceConfig
from mpsserve.embeddings.registry import VersionRecord
from mpsserve.embeddings.store import EmbeddingStore, Table
from mpsserve.errors import ConfigError

NPZ_NAME = "embeddings.npz"
IDS_SUFFIX = "__ids"
#: Seconds between two progress lines of one table.
PROGRESS_EVERY_S = 2.0


def store_config(config: ServiceConfig, source: str) -> EmbeddingsConfig:
    if config.embeddings is None:
        raise ConfigError(f"{source} has no embeddings section: no store to talk to")
    return config.embeddings


def read_tables(path: Path) -> dict[str, Table]:
    """The tables at ``path`` (see the module's docstring); ConfigError if none are there."""
    if path.is_dir() and (path / NPZ_NAME).is_file():
        path = path / NPZ_NAME
    if path.is_file() and path.suffix == ".npz":
        return _npz_tables(path)
    if (path / "demo.json").is_file():
        return _demo_tables(path / "demo.json")
    raise ConfigError(
        f"{path}: no embedding tables (an .npz file, a directory holding {NPZ_NAME}, or a "
        "demo model version with demo.json)"
    )


def _npz_tables(path: Path) -> dict[str, Table]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    tables = {
        name: Table(rows, arrays.get(name + IDS_SUFFIX))
        for name, rows in arrays.items()
        if not name.endswith(IDS_SUFFIX)
    }
    if not tables:
        raise ConfigError(f"{path} holds no tables")
    return tables


def _demo_tables(about: Path) -> dict[str, Table]:
    from mpsserve.ops.demo import DemoSpec, demo_tables

    data: dict[str, Any] = json.loads(about.read_text())
    sizes = {k: data[k] for k in ("n_dense", "n_cat", "table_rows", "dim") if k in data}
    spec = DemoSpec(**sizes)
    return {name: Table(rows) for name, rows in demo_tables(spec, int(data["seed"])).items()}


@dataclass
class ProgressLines:
    """publish's progress as lines: a table's rows written and rate, every PROGRESS_EVERY_S
    and at its end."""

    out: Any = None  # None: sys.stdout as it is at each line
    begun: dict[str, float] = field(default_factory=dict)
    shown: dict[str, float] = field(default_factory=dict)

    def __call__(self, table: str, done: int, total: int) -> None:
        now = time.monotonic()
        begun = self.begun.setdefault(table, now)  # the store reports 0 rows first
        if done < total and now - self.shown.get(table, begun) < PROGRESS_EVERY_S:
            return
        self.shown[table] = now
        rate = done / max(now - begun, 1e-9)
        percent = 100 * done / max(total, 1)
        line = f"  {table}: {done}/{total} rows ({percent:.0f}%), {rate:,.0f} rows/s"
        print(line, file=self.out or sys.stdout, flush=True)


def publish(
    config: EmbeddingsConfig,
    source: Path,
    version: str,
    buckets: int | None,
    pin: bool,
    base: str | None = None,
) -> VersionRecord:
    tables = read_tables(source)
    rows = sum(len(t.rows) for t in tables.values())
    what = f"{version}, a delta of {base}" if base else f"version {version}"
    print(f"publishing {len(tables)} table(s), {rows} rows, from {source} as {what}")
    started = time.monotonic()
    with EmbeddingStore.connect(config) as store:
        record = store.publish(version, tables, ProgressLines(), buckets, base)
        if pin:
            store.pin(version)
    took = time.monotonic() - started
    print(
        f"published version {version}: {record.rows} rows in {took:.1f}s "
        f"({record.rows / max(took, 1e-9):,.0f} rows/s), complete" + (", pinned" if pin else "")
    )
    return record


def list_versions(config: EmbeddingsConfig, as_json: bool) -> None:
    with EmbeddingStore.connect(config) as store:
        pins, leases = store.pins(), store.leases()
        records = [
            {**r.to_dict(r.version in pins), "served_by": leases.get(r.version, [])}
            for r in store.versions()
        ]
    if as_json:
        print(json.dumps(records, indent=2))
        return
    print(
        f"{'version':<24}{'state':<12}{'rows':>12}  {'created (UTC)':<21}pinned  "
        f"{'served by':<11}{'base':<20}tables"
    )
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created"]))
        tables = ", ".join(f"{n} {t['rows']}x{t['dim']}" for n, t in r["tables"].items())
        served = f"{len(r['served_by'])} replica(s)" if r["served_by"] else "-"
        print(
            f"{r['version']:<24}{r['state']:<12}{r['rows']:>12}  {created:<21}"
            f"{'yes' if r['pinned'] else 'no':<8}{served:<11}{r['base'] or '-':<20}{tables}"
        )
    if not records:
        print("(no versions)")


def delete(config: EmbeddingsConfig, version: str, force: bool) -> None:
    with EmbeddingStore.connect(config) as store:
        removed = store.delete(version, force)
    print(f"deleted embedding version {version} ({removed} row hashes)")


def collect(config: EmbeddingsConfig, keep: int, dry_run: bool) -> None:
    """``mpsserve embeddings gc``: old versions no replica serves, deleted (or listed)."""
    with EmbeddingStore.connect(config) as store:
        doomed = [r.version for r in store.collectable(keep)]
        if not doomed:
            print(f"nothing to collect (keeping the {keep} newest, the pinned and the served)")
            return
        if dry_run:
            print(f"would delete {len(doomed)} version(s): {', '.join(doomed)}")
            return
        for version in doomed:
            removed = store.delete(version)
            print(f"deleted embedding version {version} ({removed} row hashes)")


def pin(config: EmbeddingsConfig, version: str, pinned: bool) -> None:
    with EmbeddingStore.connect(config) as store:
        store.pin(version, pinned)
    print(f"embedding version {version} {'pinned' if pinned else 'unpinned'}")
