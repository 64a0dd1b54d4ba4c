"""What the embedding tier costs per request, with and without the node's shared cache.

The demo's tables (``--table-rows`` per categorical table: 26 x rows in ``cat``, plus
``history``) are published to a Redis Cluster: one given by ``--nodes``, or 3 masters on
loopback started here from ``redis-server`` ($MPSSERVE_REDIS_BIN or the venv's, as the tests
find it) and stopped by PID at the end. Then the split model's lookups
(``model.split``'s features over ``embeddings.lookup.EmbeddingLookup``: de-duplication, node
cache, store) run for ``--requests`` demo requests of ``--rows`` rows whose ids are Zipf-skewed
(``--zipf-ids`` distinct ids, ``--zipf-exponent``), one case after another:

- ``store``: no node cache, every distinct id from the store;
- ``node-<rows>``: a node cache of that many rows per table (``--cache-rows``, smaller than
  the ``cat`` table to show a partial hit rate), first a warming pass over ``--requests``
  other requests, then the timed ones.

Printed per case: lookup ms per request (median, P99), distinct ids per request, node-cache
hit rate, ids fetched from the store per request, and the process CPU per request. Figures
only; nothing is asserted. The DNN is not run (its cost is the monolithic model's minus the
gathers).

    python -m benchmarks.embedding_lookup [--table-rows 100000] [--requests 200]
        [--cache-rows 262144 4194304] [--nodes host:port ...]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mpsserve.config import EmbeddingsConfig
from mpsserve.embeddings.lookup import EmbeddingLookup, EmbeddingTier
from mpsserve.embeddings.store import EmbeddingStore, Table
from mpsserve.model.split import SplitManifest
from mpsserve.ops.demo import DemoSpec, ZipfIds, demo_tables, make_request, split_manifest

TAG = "bench-lookup"


@contextlib.contextmanager
def cluster_nodes(given: list[str], directory: Path) -> Iterator[list[str]]:
    """``given``, or a 3-master cluster on loopback for the run (stopped by PID after;
    ``tests.redis_cluster``, so pytest must be importable)."""
    if given:
        yield given
        return
    from tests.redis_cluster import Cluster, redis_binary

    binary = redis_binary()
    if binary is None:
        raise SystemExit("no redis-server: set MPSSERVE_REDIS_BIN or pass --nodes")
    cluster = Cluster(binary, directory / "redis")
    cluster.start()
    try:
        yield cluster.addresses
    finally:
        cluster.stop()


def run_case(
    lookup: EmbeddingLookup, manifest: SplitManifest, requests: list[dict[str, np.ndarray]]
) -> dict[str, float]:
    times, distinct, hits, fetched = [], 0, 0, 0
    cpu = time.process_time()
    for request in requests:
        started = time.perf_counter()
        _, counts = manifest.embed(lookup, request)  # what a split model's request does
        times.append(time.perf_counter() - started)
        for asked, hit, store in counts.values():
            distinct, hits, fetched = distinct + asked, hits + hit, fetched + store
    cpu = time.process_time() - cpu
    n = len(requests)
    return {
        "ms_p50": statistics.median(times) * 1000,
        "ms_p99": float(np.percentile(times, 99)) * 1000,
        "distinct": distinct / n,
        "hit_rate": hits / max(distinct, 1),
        "store_ids": fetched / n,
        "cpu_ms": cpu / n * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table-rows", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=2000, help="rows per request")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--zipf-ids", type=int, default=1_000_000)
    parser.add_argument("--zipf-exponent", type=float, default=1.05)
    parser.add_argument("--cache-rows", type=int, nargs="*", default=[262_144, 4_194_304])
    parser.add_argument("--nodes", nargs="*", default=[])
    args = parser.parse_args()
    spec = DemoSpec(table_rows=args.table_rows)
    manifest = SplitManifest.model_validate(split_manifest(spec, TAG))
    zipf = ZipfIds(args.zipf_ids, args.zipf_exponent)
    timed = [make_request(spec, args.rows, seed=i, ids=zipf) for i in range(args.requests)]
    warming = [
        make_request(spec, args.rows, seed=10**6 + i, ids=zipf) for i in range(args.requests)
    ]
    with tempfile.TemporaryDirectory() as tmp, cluster_nodes(args.nodes, Path(tmp)) as nodes:
        base = EmbeddingsConfig(nodes=nodes, batch_rows=5000, node_cache_dir=f"{tmp}/cache")
        with EmbeddingStore.connect(base) as store:
            started = time.monotonic()
            tables = {name: Table(rows) for name, rows in demo_tables(spec, 0).items()}
            if store.record(TAG) is None:
                store.publish(TAG, tables)
            rows = sum(len(t.rows) for t in tables.values())
            print(f"published {rows:,} rows in {time.monotonic() - started:.1f}s to {nodes}")
        print(
            f"{args.requests} requests of {args.rows} rows, Zipf ids ({args.zipf_ids:,} "
            f"distinct, exponent {args.zipf_exponent}), cat table {26 * args.table_rows:,} rows"
        )
        print(f"{'case':<16}{'ms p50':>8}{'ms p99':>8}{'distinct':>10}{'hit rate':>10}"
              f"{'store ids':>11}{'cpu ms':>8}")  # fmt: skip
        for cache_rows in [0, *args.cache_rows]:
            config = base.model_copy(update={"node_cache_rows": cache_rows})
            tier = EmbeddingTier(config)
            lookup = tier.lookup(TAG, {"cat": None, "history": None})
            if cache_rows:
                run_case(lookup, manifest, warming)
            got = run_case(lookup, manifest, timed)
            name = f"node-{cache_rows}" if cache_rows else "store"
            print(
                f"{name:<16}{got['ms_p50']:>8.2f}{got['ms_p99']:>8.2f}{got['distinct']:>10.0f}"
                f"{got['hit_rate']:>10.3f}{got['store_ids']:>11.0f}{got['cpu_ms']:>8.2f}"
            )
            lookup.close()
            tier.close()


if __name__ == "__main__":
    main()
