"""Is there a cold-start spike after a version loads? Three warm-ups, fresh processes.

The demo model (``--format``) is written once to a local store, twice: as it is, and with a
TF Serving warm-up file of ``--warmup-requests`` records (``mpsserve demo-model
--warmup-requests``: 2000, 256 and 32 rows in turn). Each trial is a fresh process (spawned,
so TensorFlow's or PyTorch's first-call costs are not shared between trials) that builds a
``Servable`` (the model layer, no Ray, no transport), loads the version (load, warm-up, swap
in) and then times its first ``--requests`` real requests of ``--rows`` rows
(``ops.demo.make_request``, distinct seeds, built before the load), one at a time. Cases:

- ``none``: no warm-up at all (``warmup_rows: 0``, no file);
- ``synthetic``: today's default, one synthetic request of ``warmup_rows`` (8) rows;
- ``file``: the version's warm-up file (which replaces the synthetic request).

Trials of the cases are interleaved, so a noisy neighbour hurts them alike. Printed per case,
medians over trials: the first request, the 2nd-10th requests, the steady state (the second
half of the requests), the warm-up's seconds, the load's (load + warm-up) and the ratio
first/steady (each trial's, then their median).
Figures only; nothing is asserted.

    python -m benchmarks.warmup_cold_start [--format torch] [--trials 5] [--requests 100]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CASES = ("none", "synthetic", "file")


@dataclass(frozen=True)
class Trial:
    case: str
    store: str
    runtime: str
    rows: int
    requests: int
    table_rows: int
    threads: int


def _run_trial(trial: Trial, results: Any) -> None:
    """In a fresh process: load the version, then time the first real requests."""
    from mpsserve.config import ModelConfig
    from mpsserve.model.servable import Servable
    from mpsserve.ops.demo import DemoSpec, make_request

    spec = DemoSpec(table_rows=trial.table_rows)
    requests = [make_request(spec, trial.rows, seed=k) for k in range(trial.requests)]
    config = ModelConfig(
        name="rec",
        store=trial.store,
        runtime=trial.runtime,
        warmup_rows=0 if trial.case == "none" else 8,
        intra_op_threads=trial.threads,
        poll_interval_s=3600,
    )
    servable = Servable(config, device="cpu")
    started = time.perf_counter()
    servable.load()
    load_s = time.perf_counter() - started
    latencies = []
    for request in requests:
        started = time.perf_counter()
        servable.infer(request)
        latencies.append(time.perf_counter() - started)
    warmup = servable.warmup or {}
    warmup_s = warmup.get("file_s", 0.0) + warmup.get("synthetic_s", 0.0)
    results.put((load_s, warmup_s, latencies))


def measure(trial: Trial) -> tuple[float, float, list[float]]:
    """(load seconds, warm-up seconds, per-request seconds) of one trial in its own process."""
    context = mp.get_context("spawn")
    results: Any = context.Queue()
    process = context.Process(target=_run_trial, args=(trial, results))
    process.start()
    try:
        outcome: tuple[float, float, list[float]] = results.get(timeout=600)
        return outcome
    finally:
        process.join(30)


def build_stores(root: Path, fmt: str, table_rows: int, warmup_requests: int) -> dict[str, Path]:
    """The demo's version 1 without a warm-up file (``plain``) and with one (``file``)."""
    from mpsserve.ops.demo import DemoSpec, write_demo_model, write_warmup_file

    spec = DemoSpec(table_rows=table_rows)
    plain, with_file = root / "plain", root / "file"
    write_demo_model(plain, fmt, version=1, spec=spec)  # type: ignore[arg-type]
    shutil.copytree(plain / "1", with_file / "1", copy_function=os.link)  # the same files
    write_warmup_file(with_file / "1", spec, warmup_requests)
    return {"none": plain, "synthetic": plain, "file": with_file}


def ms(seconds: float) -> str:
    return f"{1000 * seconds:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("tensorflow", "torch"), default="tensorflow")
    parser.add_argument("--trials", type=int, default=5, help="fresh processes per case")
    parser.add_argument("--requests", type=int, default=100, help="timed per trial (>= 20)")
    parser.add_argument("--rows", type=int, default=2000, help="rows per request")
    parser.add_argument("--warmup-requests", type=int, default=8, help="records in the file")
    parser.add_argument("--table-rows", type=int, default=100_000, help="demo table rows")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads; 0 = auto")
    args = parser.parse_args()
    requests = max(args.requests, 20)
    print(
        f"demo model ({args.format}, {args.table_rows} table rows), {args.rows}-row requests, "
        f"{args.trials} fresh processes per case, {requests} requests each, warm-up file of "
        f"{args.warmup_requests} records; {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="warmup-cold-start-") as tmp:
        started = time.monotonic()
        stores = build_stores(Path(tmp), args.format, args.table_rows, args.warmup_requests)
        print(f"built the model in {time.monotonic() - started:.0f} s")
        seen: dict[str, list[tuple[float, float, list[float]]]] = {case: [] for case in CASES}
        for index in range(args.trials):
            for case in CASES:
                trial = Trial(
                    case,
                    str(stores[case]),
                    args.format,
                    args.rows,
                    requests,
                    args.table_rows,
                    args.threads,
                )
                load_s, warmup_s, lat = measure(trial)
                seen[case].append((load_s, warmup_s, lat))
                print(
                    f"trial {index} {case:9s}: load {load_s:5.2f} s (warm-up {warmup_s:5.2f} s), "
                    f"first {ms(lat[0])} ms, 2nd-10th {ms(statistics.median(lat[1:10]))} ms, "
                    f"steady {ms(statistics.median(lat[requests // 2 :]))} ms"
                )
    print(
        f"\nmedians over trials (ms; load in s; steady = requests {requests // 2 + 1}-{requests}; "
        f"first/steady per trial)\n"
        f"{'case':9s} {'first':>8s} {'2nd-10th':>8s} {'steady':>8s} {'warm-up':>8s} "
        f"{'load s':>8s} {'first/steady':>12s}"
    )
    for case in CASES:
        runs = seen[case]
        first = statistics.median(lat[0] for _, _, lat in runs)
        early = statistics.median(statistics.median(lat[1:10]) for _, _, lat in runs)
        steady = statistics.median(statistics.median(lat[requests // 2 :]) for _, _, lat in runs)
        warmup = statistics.median(w for _, w, _ in runs)
        load = statistics.median(load for load, _, _ in runs)
        ratio = statistics.median(
            lat[0] / statistics.median(lat[requests // 2 :]) for *_, lat in runs
        )
        print(
            f"{case:9s} {ms(first)} {ms(early)} {ms(steady)} {ms(warmup)} {load:8.2f} {ratio:12.1f}"
        )


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"({time.monotonic() - started:.0f} s)")
