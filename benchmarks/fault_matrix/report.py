"""The figures of one case, its verdict, and the markdown table."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from benchmarks.fault_matrix.faults import Fault
from benchmarks.fault_matrix.health import (
    StatusWatcher,
    failed_versions,
    model_rows,
    problems,
    recovery_s,
    served,
)
from benchmarks.fault_matrix.load import OK, Load, Outcome


def p99_ms(outcomes: list[Outcome]) -> float | None:
    good = [o[1] - o[0] for o in outcomes if o[2] == OK]
    return round(float(np.percentile(good, 99)) * 1000, 1) if good else None


def flips(outcomes: list[Outcome]) -> int:
    seen = [o[3] for o in sorted(outcomes, key=lambda o: o[1]) if o[2] == OK]
    return sum(a != b for a, b in itertools.pairwise(seen))


def pids_of(report: dict[str, Any], rows: str, model: str | None = None) -> list[int]:
    found = report.get(rows) or []
    return sorted(r["pid"] for r in found if model is None or r.get("model") == model)


def wall_clock(monotonic: float) -> str:
    ago = timedelta(seconds=time.monotonic() - monotonic)
    return (datetime.now(UTC) - ago).isoformat(timespec="seconds")


def graphs(report: dict[str, Any], model: str) -> dict[int, str]:
    """CUDA graphs per replica pid: on, off, or "-" (not reported or not on a GPU)."""
    found = {}
    for row in model_rows(report, model):
        state = row.get("graphs")
        if state is None or row.get("device") != "gpu":
            found[row["pid"]] = "-"
        else:
            found[row["pid"]] = "on" if state.get("enabled") else "off"
    return found


@dataclass(frozen=True)
class Span:
    """One case's times (monotonic): the fault, the window's end, healthy again after it."""

    name: str
    fault: Fault
    before: dict[str, Any]  # the status report the target was picked from
    end: float
    settled: float


class CaseFigures:
    def __init__(
        self, args: argparse.Namespace, load: Load, status: StatusWatcher, span: Span
    ) -> None:
        self.args, self.load, self.span = args, load, span
        self.name, self.fault, self.before = span.name, span.fault, span.before
        self.end, self.settled = span.end, span.settled
        self.window = load.done_between(self.fault.at, self.end)
        self.baseline = load.done_between(self.fault.at - args.baseline_s, self.fault.at)
        polls = status.since(self.fault.at)
        self.polls = [p for p in polls if p.started <= self.end] or polls[:1]
        self.after = self.polls[-1].report if self.polls else {}

    def failed(self) -> dict[str, Any]:
        bad = [o for o in self.window if o[2] != OK]
        late = [o for o in self.load.done_between(self.end, self.settled) if o[2] != OK]
        return {
            "failed": len(bad),
            "failed_by_status": dict(Counter(o[2] for o in bad)),
            "failed_in_flight_at_fault": sum(self._on_killed(o) for o in bad),
            "failed_after_window": len(late),
            "failed_after_window_by_status": dict(Counter(o[2] for o in late)),
        }

    def _on_killed(self, outcome: tuple[Any, ...]) -> bool:
        """Sent before the fault, or a transport error (no HTTP status) within
        ``KILLED_CONNECTION_S`` of it: a request the client wrote on a kept-alive connection
        the killed process held (the kernel resets it; no server can answer it)."""
        sent, done, status = outcome[0], outcome[1], outcome[2]
        if sent < self.fault.at:
            return True
        reset = not str(status).isdigit() and status not in ("timeout", "bad-reply")
        return reset and done - self.fault.at <= KILLED_CONNECTION_S

    def latency(self) -> dict[str, Any]:
        steady, during = p99_ms(self.baseline), p99_ms(self.window)
        window_s = self.end - self.fault.at
        return {
            "p99_steady_ms": steady,
            "p99_window_ms": during,
            "p99_ratio": round(during / steady, 2) if steady and during else None,
            "max_window_ms": round(max((o[1] - o[0] for o in self.window), default=0) * 1000, 1),
            "qps_steady": round(len(self.baseline) / self.args.baseline_s, 1),
            "qps_window": round(len(self.window) / window_s, 1),
        }

    def versions(self) -> dict[str, Any]:
        tail = [o for o in self.window if o[1] >= self.end - self.args.quiet_s and o[2] == OK]
        at_end = served(self.after, self.fault.expect.model)
        replies_at_end = sorted({str(o[3]) for o in tail})
        return {
            "versions_served": dict(Counter(str(o[3]) for o in self.window if o[2] == OK)),
            "version_flips": flips(self.window),
            "versions_at_end": sorted(at_end),
            "reply_versions_at_end": replies_at_end,
            "split_at_end": len(at_end) > 1 or len(replies_at_end) > 1,
        }

    def recovery(self) -> dict[str, Any]:
        failed = [o[1] for o in self.window if o[2] != OK]
        expect, at = self.fault.expect, self.fault.at
        return {
            "time_to_recover_s": recovery_s(
                self.polls, expect, failed, at, self.end, self.args.quiet_s
            ),
            "last_failure_after_fault_s": round(max(failed) - at, 2) if failed else None,
            "status_at_end": self.after.get("verdict"),
            "problems_at_end": problems(self.after, expect) if self.after else ["no status"],
            "status_timeline": self.timeline(),
        }

    def timeline(self) -> list[list[Any]]:
        """Status changes in the window: [seconds after t0, problems or "healthy"]."""
        changes: list[list[Any]] = []
        for poll in self.polls:
            state = "; ".join(problems(poll.report, self.fault.expect)) or "healthy"
            if not changes or changes[-1][1] != state:
                changes.append([round(poll.started - self.fault.at, 1), state])
        return changes

    def processes(self) -> dict[str, Any]:
        model = self.fault.expect.model
        before, after = (
            pids_of(self.before, "replicas", model),
            pids_of(self.after, "replicas", model),
        )
        failed: dict[str, Any] = {}
        for row in model_rows(self.after, model):
            failed.update(failed_versions(row))
        return {
            "model_pids_before": before,
            "model_pids_after": after,
            "model_pids_replaced": sorted(set(before) - set(after)),
            "ingress_pids_before": pids_of(self.before, "ingresses"),
            "ingress_pids_after": pids_of(self.after, "ingresses"),
            "graphs_before": graphs(self.before, model),
            "graphs_after": graphs(self.after, model),
            "store_failed_at_end": failed,
        }

    def per_second(self) -> list[list[int]]:
        """[second after t0, good replies, failed] for the baseline and the window."""
        counts: dict[int, list[int]] = {}
        for o in self.baseline + self.window:
            cell = counts.setdefault(int(np.floor(o[1] - self.fault.at)), [0, 0])
            cell[o[2] != OK] += 1
        return [[s, *counts[s]] for s in sorted(counts)]

    def report(self, settled: bool, settled_before: bool) -> dict[str, Any]:
        row: dict[str, Any] = {
            "case": self.name,
            "target": self.fault.target,
            "injected_at": wall_clock(self.fault.at),
            "window_s": round(self.end - self.fault.at, 1),
            "baseline_s": self.args.baseline_s,
            "settled_before": settled_before,
            "requests": len(self.window),
            **self.failed(),
            **self.latency(),
            **self.versions(),
            **self.recovery(),
            **self.processes(),
            "settled_after_s": round(self.settled - self.end, 1) if settled else None,
            "info": self.fault.info,
            "per_second": self.per_second(),
        }
        row["verdict"], row["reasons"] = verdict(row)
        return row


def verdict(row: dict[str, Any]) -> tuple[str, list[str]]:
    reasons = []
    allowed = row["failed_in_flight_at_fault"] if row["case"] == "kill-ingress" else 0
    allowed += (row.get("info") or {}).get("allowed_failures", 0)
    if (bad := row["failed"] - allowed) > 0:
        reasons.append(f"{bad} failed in the window {row['failed_by_status']}")
    if row["failed_after_window"]:
        reasons.append(f"{row['failed_after_window']} failed after the window")
    if row["split_at_end"]:
        reasons.append(f"split versions at the end {row['versions_at_end']}")
    if row["time_to_recover_s"] is None:
        reasons.append(f"not recovered ({'; '.join(row['problems_at_end']) or 'failures'})")
    return ("FAIL" if reasons else "PASS"), reasons


# ---------------------------------------------------------------------------------------------
# Output

KILLED_CONNECTION_S = 1.0  # a connection reset this soon after a kill: the killed one's

HEADER = (
    "| case | requests | failed (by status) | recover s | P99 steady ms | P99 window ms "
    "| versions served | replicas replaced | graphs after | verdict |"
)


def by_number(item: tuple[str, int]) -> tuple[int, str]:
    return (len(item[0]), item[0])


def markdown_row(row: dict[str, Any]) -> str:
    if row["verdict"] == "SKIP":
        return f"| {row['case']} | | | | | | | | | SKIP |"
    failed = ", ".join(f"{k}: {v}" for k, v in row["failed_by_status"].items())
    states = Counter(row["graphs_after"].values())
    cells = [
        row["case"],
        str(row["requests"]),
        f"{row['failed']}" + (f" ({failed})" if failed else ""),
        "n/a" if row["time_to_recover_s"] is None else f"{row['time_to_recover_s']:g}",
        str(row["p99_steady_ms"]),
        str(row["p99_window_ms"]),
        ", ".join(f"v{k}: {n}" for k, n in sorted(row["versions_served"].items(), key=by_number)),
        str(len(row["model_pids_replaced"])),
        ", ".join(f"{k}: {v}" for k, v in states.items() if k != "-") or "-",
        row["verdict"],
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["cases"]
    rule = "|" + "---|" * HEADER.count(" | ") + "---|"
    lines = [f"Command: `{doc['meta']['command']}`", "", HEADER, rule, *map(markdown_row, rows)]
    lines += ["", *(f"- {r['case']}: {r['verdict']}{verdict_tail(r)}" for r in rows)]
    return "\n".join(lines) + "\n"


def verdict_tail(row: dict[str, Any]) -> str:
    return f": {'; '.join(row['reasons'])}" if row["reasons"] else ""


def write(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(doc))
