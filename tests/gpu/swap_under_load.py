"""Hot swaps and first-time graph captures while the same process serves (PyTorch, CUDA graphs;
no Ray): what each capture mode does to the requests running beside it.

One process holds a ``Servable`` serving version 1 with CUDA graphs on, and ``--threads``
threads send 2000-row requests to it back to back (a replica's inference threads at full
rate). After a steady window, ``--swaps`` new versions are published one after another; each
is loaded, warmed with version 1's graph shapes (captures included) and swapped in while the
threads keep serving; meanwhile one thread also sends requests of new row counts, whose graphs
are captured under load. Reported per mode: requests, errors, steady and swap-window P99/max,
whether the process was marked faulty (which fails Serve's health check), graphs on at the end.

Modes: ``concurrent`` (the default: thread-local capture mode, one capture at a time),
``exclusive`` (``MPSSERVE_GRAPH_CAPTURE=exclusive``: other work pauses during a capture) and
``global`` (PyTorch's default capture mode, what mpsserve did before; to show the failure).
Each mode runs in its own process, so one mode's broken CUDA context cannot touch another's.
    python3 tests/gpu/swap_under_load.py --modes global,concurrent,exclusive --out $OUT/swap.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


class Traffic(threading.Thread):
    """Requests back to back; every outcome kept as (start, latency_s, ok, version)."""

    def __init__(self, servable: Any, requests: list[dict[str, np.ndarray]]) -> None:
        super().__init__(daemon=True)
        self.servable, self.requests = servable, requests
        self.outcomes: list[tuple[float, float, bool, str]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            request = self.requests[i % len(self.requests)]
            i += 1
            started = time.monotonic()
            try:
                version, _ = self.servable.infer(request)
                ok = True
            except Exception as exc:
                ok, version = False, "-"
                if len(self.errors) < 5:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            self.outcomes.append((started, time.monotonic() - started, ok, version))


def time_phases(targets: list[tuple[Any, str, str]]) -> list[tuple[str, float, float]]:
    """Record when each swap loads, warms up and unloads the old version: (phase, start, end)."""
    phases: list[tuple[str, float, float]] = []
    for owner, name, phase in targets:
        original = getattr(owner, name)

        def timed(self: Any, *a: Any, _f: Any = original, _p: str = phase) -> Any:
            began = time.monotonic()
            try:
                return _f(self, *a)
            finally:
                phases.append((_p, began, time.monotonic()))

        setattr(owner, name, timed)
    return phases


def by_phase(
    outcomes: list[tuple[float, float, bool, str]],
    phases: list[tuple[str, float, float]],
    start: float,
    end: float,
) -> dict[str, Any]:
    """P99 and count of requests that overlapped a warm-up, the load before it, an unload, or
    none of them."""
    spans = {
        name: [(b, e) for p, b, e in phases if p == name and b >= start]
        for name in ("warm", "load+warm", "unload")
    }
    groups: dict[str, list[float]] = {"warm": [], "load": [], "unload": [], "other": []}
    for at, lat, ok, _ in outcomes:
        if not ok or not start <= at < end:
            continue
        span = (at, at + lat)
        group = next(
            (
                g
                for g, n in (("warm", "warm"), ("load", "load+warm"), ("unload", "unload"))
                if _overlaps(span, spans[n])
            ),
            "other",
        )
        groups[group].append(lat)
    return {
        **{f"{n}_spans_s": [round(e - b, 3) for b, e in v] for n, v in spans.items()},
        **{k: {"n": len(v), "p99_ms": percentile(v, 99)} for k, v in groups.items()},
    }


def _overlaps(span: tuple[float, float], spans: list[tuple[float, float]]) -> bool:
    return any(span[0] < e and span[1] > b for b, e in spans)


def publish(store: Path, version: int) -> None:
    tmp = store / f".tmp-{version}"
    shutil.copytree(store / "1", tmp)
    tmp.rename(store / str(version))


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    from mpsserve.config import ModelConfig
    from mpsserve.model.runtime import graphs
    from mpsserve.model.servable import Servable
    from mpsserve.ops.demo import DemoSpec, make_request, write_demo_model

    if args.mode == "global":
        import torch

        graph = torch.cuda.graph
        graphs.torch.cuda.graph = lambda *a, **k: graph(  # type: ignore[misc,assignment]
            *a, **{**k, "capture_error_mode": "global"}
        )
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    from mpsserve.model.runtime import runtime_class

    phases = time_phases(
        [
            (Servable, "_load_version", "load+warm"),
            (Servable, "_warm_up", "warm"),
            (runtime_class(args.runtime), "close", "unload"),
        ]
    )
    store = Path(tempfile.mkdtemp(prefix="swap-store-"))
    spec = DemoSpec(table_rows=args.table_rows)
    write_demo_model(store, args.runtime, version=1, seed=0, spec=spec)
    config = ModelConfig(name="rec", store=str(store), runtime=args.runtime, poll_interval_s=3600)
    servable = Servable(config, device="auto")
    servable.load()
    steady_requests = [make_request(spec, rows=2000, seed=s) for s in range(4)]
    for request in steady_requests:  # capture the 2000-row bucket before measuring
        servable.infer(request)
    threads = [Traffic(servable, steady_requests) for _ in range(args.threads)]
    odd_rows = [2300, 2700, 3100, 3500, 4000, 4500]
    odd = Traffic(servable, [make_request(spec, rows=r, seed=r) for r in odd_rows])
    for thread in threads:
        thread.start()
    time.sleep(args.steady_s)
    swap_started = time.monotonic()
    if args.new_buckets:
        odd.start()  # new buckets captured under load, beside the swaps
    swap_times = []
    for version in range(2, 2 + args.swaps):
        publish(store, version)
        began = time.monotonic()
        servable.poll()
        swap_times.append(round(time.monotonic() - began, 2))
    time.sleep(1.0)
    swap_ended = time.monotonic()
    for thread in [*threads, odd]:
        thread.stop.set()
        if thread.is_alive():
            thread.join()
    outcomes = [o for t in threads for o in t.outcomes]
    steady = [lat for at, lat, ok, _ in outcomes if ok and at < swap_started]
    window = [lat for at, lat, ok, _ in outcomes if ok and swap_started <= at < swap_ended]
    runtime = servable.runtime
    return {
        "mode": args.mode,
        "threads": args.threads,
        "swaps": args.swaps,
        "served_version": servable.version,
        "requests": len(outcomes) + len(odd.outcomes),
        "errors": sum(1 for o in [*outcomes, *odd.outcomes] if not o[2]),
        "error_samples": [e for t in [*threads, odd] for e in t.errors][:5],
        "new_bucket_requests": len(odd.outcomes),
        "steady_p50_ms": percentile(steady, 50),
        "steady_p99_ms": percentile(steady, 99),
        "swap_window_s": round(swap_ended - swap_started, 2),
        "swap_p99_ms": percentile(window, 99),
        "swap_max_ms": percentile(window, 100),
        "swap_seconds": swap_times,
        "p99_ms_by_phase": by_phase(outcomes, phases, swap_started, swap_ended),
        "fault": servable.fault,
        "problem": servable.problem(),
        "failed_versions": servable.store_status()["failed"],
        "graphs": runtime.graph_status() if runtime is not None else None,
        "runtime": args.runtime,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="global,concurrent,exclusive")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # one mode, in a child
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--steady-s", type=float, default=5.0)
    parser.add_argument("--table-rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--runtime", choices=["torch", "tensorflow"], default="torch")
    parser.add_argument("--new-buckets", type=int, default=1, help="1: also new row counts")
    parser.add_argument("--switch-interval-ms", type=float, default=0, help="sys.setswitchinterval")
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(run_mode(args)), flush=True)
        return
    results = []
    for mode in args.modes.split(","):
        env = {**os.environ}
        env["MPSSERVE_GRAPH_CAPTURE"] = "exclusive" if mode == "exclusive" else "concurrent"
        command = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"mode": mode, "exit": done.returncode}
        if not lines:
            result["stderr_tail"] = done.stderr[-2000:]
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
