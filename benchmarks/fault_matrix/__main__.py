"""``python -m benchmarks.fault_matrix``: see the package docstring."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import benchmarks.fault_matrix as package
from benchmarks.fault_matrix.faults import CASES
from benchmarks.fault_matrix.health import watch_status
from benchmarks.fault_matrix.report import markdown
from benchmarks.fault_matrix.runner import run


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def case_list(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    return list(dict.fromkeys(names))  # the order given, each once


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fault_matrix",
        description=package.__doc__,
        formatter_class=Formatter,
    )
    p.add_argument("--config", required=True, type=Path, help="the running service's YAML")
    p.add_argument("--url", help="HTTP base URL (default: 127.0.0.1:<ingress.http_port>)")
    p.add_argument("--address", help="Ray address for status (default: config, then auto)")
    p.add_argument("--model", help="model to load and publish (default: the first)")
    p.add_argument("--cases", type=case_list, default=",".join(CASES), help="comma-separated")
    p.add_argument("--out", type=Path, default=Path("fault-matrix.json"), help="JSON results")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop workers")
    p.add_argument("--processes", type=int, default=1, help="client processes")
    p.add_argument("--rows", type=int, default=2000, help="rows per request")
    p.add_argument("--bodies", type=int, default=4, help="distinct requests per process")
    p.add_argument("--timeout-s", type=positive, default=60.0, help="per request")
    p.add_argument("--warmup-s", type=float, default=5.0, help="load before the first case")
    p.add_argument("--baseline-s", type=positive, default=10.0, help="steady window per case")
    p.add_argument("--window-s", type=positive, default=60.0, help="load after each fault")
    p.add_argument("--max-extra-s", type=float, default=60.0, help="window extension")
    p.add_argument("--stop-s", type=positive, default=45.0, help="SIGSTOP hold")
    p.add_argument(
        "--fault-kind", choices=("assert", "address"), default="address", help="gpu-client-fault"
    )
    p.add_argument("--slow-gap-s", type=float, default=12.0, help="slow publish gap")
    p.add_argument("--quiet-s", type=positive, default=10.0, help="calm needed to recover")
    p.add_argument("--poll-s", type=positive, default=2.0, help="status poll interval")
    p.add_argument("--settle-timeout-s", type=positive, default=120.0, help="wait for healthy")
    p.add_argument("--watch-status", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.concurrency, args.processes, args.rows, args.bodies) < 1:
        p.error("--concurrency, --processes, --rows and --bodies must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.watch_status:
        watch_status(str(args.config), args.address, args.poll_s)
        return 0
    try:
        doc = run(args, argv)
    except KeyboardInterrupt:
        print("\ninterrupted; the results file holds the cases finished", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"fault matrix failed: {exc}", file=sys.stderr)
        return 2
    print(markdown(doc), end="")
    return 1 if any(c["verdict"] == "FAIL" for c in doc["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
