"""The split demo model (DNN + embedding store) beside the monolithic one, in one run.

One ``mpsserve serve`` serves both builds of the demo (same seed, ``--format``): ``rec``
(tables inside the model) and ``rec_split`` (the DNN alone; its tables published to a Redis
Cluster: one given by ``--nodes``, or 3 masters on loopback started here from
``redis-server``, as the tests start theirs). ``benchmarks.loadgen`` then drives each model in
turn over HTTP with Zipf-skewed ids (``--zipf-ids``, ``--zipf-exponent``); after each, the
ingress's metrics port gives the embedding tier's counters for the split model: distinct ids
per request, node-cache hit rate, ids fetched from the store, and the lookup time's P50/P99.

Printed (and written to ``--out``/summary.md; loadgen's own results in ``--out``/results.json):
per model and concurrency, req/s, P50/P99, machine CPU per request, and the split model's
cache figures. Figures only; nothing is asserted.

    python -m benchmarks.split_vs_monolithic --format torch --concurrency 16,32 \\
        --duration-s 15 --out /tmp/split-bench [--cache-rows 1048576] [--replicas-per-gpu 4]

On a CPU machine the replicas are CPU replicas (``--cpu-replicas``); with GPUs, the
placement's GPU fields apply. Needs ``ray`` (``mpsserve serve``), ``redis`` and, without
``--nodes``, the ``redis-server`` binary ($MPSSERVE_REDIS_BIN or the venv's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from benchmarks.embedding_lookup import cluster_nodes
from mpsserve.config import EmbeddingsConfig
from mpsserve.embeddings.store import EmbeddingStore, Table
from mpsserve.ops.demo import DemoSpec, demo_tables, write_demo_model

TAG = "bench-split-1"
SEED = 0
MODELS = ("rec", "rec_split")


def service(args: argparse.Namespace, store: Path, nodes: list[str]) -> dict[str, Any]:
    placement: dict[str, Any] = {
        "cpu_replicas": args.cpu_replicas,
        "cpus_per_replica": args.cpus_per_replica,
        "gpu_share": 0.5,  # the two models share each GPU half and half
    }
    if args.replicas_per_gpu:
        placement["replicas_per_gpu"] = args.replicas_per_gpu
    model = {"runtime": args.format, "max_rows": 4096, "placement": placement}
    return {
        "models": [{"name": name, "store": str(store / name), **model} for name in MODELS],
        "ingress": {
            "host": "127.0.0.1",
            "http_port": args.http_port,
            "grpc_port": args.http_port + 1,
            "metrics_port": args.http_port + 2,
        },
        "embeddings": {
            "nodes": nodes,
            "node_cache_rows": args.cache_rows,
            "node_cache_dir": str(store.parent / "node-cache"),
        },
    }


def serve(config: Path, timeout_s: float, log: Path) -> subprocess.Popen[str]:
    """``mpsserve serve``, once its banner says it serves; its output echoed until then, and
    copied to ``log`` after (a thread keeps reading it, so serve never blocks on a full
    pipe)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpsserve.ops.cli", "serve", "--config", str(config)],
        cwd=config.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"  serve: {line.rstrip()}", flush=True)
        if "Ctrl-C stops" in line:
            threading.Thread(target=_copy, args=(proc, log), daemon=True).start()
            return proc
        if time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"mpsserve serve did not start within {timeout_s:g}s")
    raise SystemExit(f"mpsserve serve exited ({proc.wait()}) before it served")


def _copy(proc: subprocess.Popen[str], log: Path) -> None:
    assert proc.stdout is not None
    with log.open("a") as out:
        for line in proc.stdout:
            out.write(line)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def embedding_counters(metrics_url: str) -> dict[str, float]:
    """The split model's counters on the metrics port: ids by level, lookup histogram."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if 'model="rec_split"' not in line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0]
        value = float(line.rsplit(" ", 1)[1])
        if name == "ray_mpsserve_embedding_ids_total":
            level = re.search(r'level="([^"]+)"', line)
            key = f"ids_{level.group(1) if level else '?'}"
        elif name == "ray_mpsserve_embedding_lookup_duration_seconds_bucket":
            le = re.search(r'le="([^"]+)"', line)
            key = f"lookup_le_{le.group(1) if le else '?'}"
        elif name == "ray_mpsserve_embedding_lookup_duration_seconds_count":
            key = "lookups"
        else:
            continue
        totals[key] = totals.get(key, 0.0) + value
    return totals


def quantile(delta: dict[str, float], q: float) -> float | None:
    """The lookup time's quantile ``q`` from the histogram's bucket deltas (upper bound)."""
    prefix = "lookup_le_"
    buckets = sorted(
        (float(k.removeprefix(prefix)), v) for k, v in delta.items() if k.startswith(prefix)
    )
    total = delta.get("lookups", 0.0)
    if not total:
        return None
    return next((le for le, count in buckets if count >= q * total), None)


def load(args: argparse.Namespace, model: str, out: Path) -> None:
    command = [
        sys.executable, "-m", "benchmarks.loadgen", "--url", f"http://127.0.0.1:{args.http_port}",
        "--model", model, "--label", model, "--concurrency", args.concurrency,
        "--duration-s", str(args.duration_s), "--warmup-s", str(args.warmup_s),
        "--processes", str(args.processes), "--rows", str(args.rows),
        "--table-rows", str(args.table_rows), "--zipf-ids", str(args.zipf_ids),
        "--zipf-exponent", str(args.zipf_exponent), "--out", str(out / "results.json"),
    ]  # fmt: skip
    subprocess.run(command, check=True)


def summary(out: Path, cache: dict[str, Any]) -> str:
    steps = json.loads((out / "results.json").read_text())["steps"]
    lines = [
        "| model | concurrency | req/s | P50 ms | P99 ms | machine CPU ms/req | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        cpu = s.get("machine_cpu_s_per_req")
        lines.append(
            f"| {s['label']} | {s['concurrency']} | {s['qps']:.0f} | {s['p50_ms']:.1f} | "
            f"{s['p99_ms']:.1f} | {'n/a' if cpu is None else f'{cpu * 1000:.2f}'} | "
            f"{s['errors']} |"
        )
    lines.append("")
    lines.append(f"rec_split's embedding tier over its whole run: {json.dumps(cache)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", choices=["torch", "tensorflow"], default="torch")
    parser.add_argument("--table-rows", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--concurrency", default="16,32")
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--zipf-ids", type=int, default=1_000_000)
    parser.add_argument("--zipf-exponent", type=float, default=1.05)
    parser.add_argument("--cache-rows", type=int, default=1 << 20)
    parser.add_argument("--cpu-replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--replicas-per-gpu", type=int, default=0)
    parser.add_argument("--http-port", type=int, default=28900)
    parser.add_argument("--nodes", nargs="*", default=[])
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/split-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").unlink(missing_ok=True)
    spec = DemoSpec(table_rows=args.table_rows)
    with tempfile.TemporaryDirectory() as tmp, cluster_nodes(args.nodes, Path(tmp)) as nodes:
        store = Path(tmp) / "models"
        write_demo_model(store / "rec", args.format, 1, SEED, spec)
        write_demo_model(store / "rec_split", args.format, 1, SEED, spec, split=TAG)
        started = time.monotonic()
        with EmbeddingStore.connect(EmbeddingsConfig(nodes=nodes, batch_rows=5000)) as client:
            tables = {name: Table(rows) for name, rows in demo_tables(spec, SEED).items()}
            client.publish(TAG, tables)
        print(f"published the tables in {time.monotonic() - started:.1f}s to {nodes}")
        config = Path(tmp) / "service.yaml"
        config.write_text(yaml.safe_dump(service(args, store, nodes)))
        proc = serve(config, args.start_timeout_s, args.out / "serve.log")
        metrics_url = f"http://127.0.0.1:{args.http_port + 2}/metrics"
        try:
            for model in MODELS:
                before = embedding_counters(metrics_url)
                load(args, model, args.out)
                time.sleep(12)  # Ray's metrics agent exports every few seconds
            after = embedding_counters(metrics_url)
        finally:
            stop(proc)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    requested = delta.get("ids_requested", 0.0)
    lookups = delta.get("lookups", 0.0)
    cache = {
        "lookups": lookups,
        "distinct_ids_per_request": round(requested / lookups, 1) if lookups else None,
        "node_cache_hit_rate": round(delta.get("ids_node_cache", 0.0) / requested, 3)
        if requested
        else None,
        "store_ids_per_request": round(delta.get("ids_store", 0.0) / lookups, 1)
        if lookups
        else None,
        "lookup_p50_s_upper": quantile(delta, 0.5),
        "lookup_p99_s_upper": quantile(delta, 0.99),
    }
    text = summary(args.out, cache)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
