"""Plot a load-generator results file: QPS and P99 latency against concurrency.

    python -m benchmarks.plot results.json out.png

One line per (label, protocol); when one of them was measured at several row counts, each row
count gets its own line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Series = dict[str, list[tuple[int, float, float]]]


def load_steps(path: Path) -> list[dict[str, Any]]:
    steps = json.loads(path.read_text()).get("steps", [])
    if not steps:
        raise ValueError(f"{path} holds no steps")
    return list(steps)


def series(steps: list[dict[str, Any]]) -> Series:
    """Points (concurrency, qps, p99 ms; NaN when missing) per line name, by concurrency."""
    rows_seen: dict[tuple[str, str], set[int]] = defaultdict(set)
    for s in steps:
        rows_seen[(s["label"], s["protocol"])].add(s["rows"])
    lines: Series = defaultdict(list)
    for s in steps:
        name = f"{s['label']} ({s['protocol']})"
        if len(rows_seen[(s["label"], s["protocol"])]) > 1:
            name += f", {s['rows']} rows"
        p99 = s.get("p99_ms")
        lines[name].append((s["concurrency"], s["qps"], math.nan if p99 is None else p99))
    return {name: sorted(points) for name, points in sorted(lines.items())}


def top_of(ax: Any) -> float:
    """10 % above the highest point of the panel (1 when it has none)."""
    values = [y for line in ax.get_lines() for y in line.get_ydata() if not math.isnan(y)]
    return max(values, default=0.0) * 1.1 or 1.0


def plot(steps: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_qps, ax_p99) = plt.subplots(1, 2, figsize=(12, 4.5))
    concurrencies = sorted({s["concurrency"] for s in steps})
    for name, points in series(steps).items():
        x, qps, p99 = zip(*points, strict=True)
        ax_qps.plot(x, qps, marker="o", label=name)
        ax_p99.plot(x, p99, marker="o", label=name)
    panels = ((ax_qps, "Throughput", "QPS"), (ax_p99, "P99 latency", "P99 ms"))
    for ax, title, unit in panels:
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(unit)
        if len(concurrencies) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_ylim(0, top_of(ax))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", type=Path, help="results JSON of benchmarks.loadgen")
    p.add_argument("out", type=Path, help="image to write (PNG)")
    args = p.parse_args(argv)
    try:
        plot(load_steps(args.results), args.out)
    except (OSError, ValueError, KeyError) as exc:
        print(f"plot failed: {exc!r}", file=sys.stderr)
        return 1
    print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
