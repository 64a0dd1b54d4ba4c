"""One case after another against the running service, the load on throughout."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from benchmarks.fault_matrix.faults import INJECT, Context, Fault, signal_pid
from benchmarks.fault_matrix.health import (
    Expect,
    Poll,
    StatusWatcher,
    model_rows,
    problems,
    recovery_s,
)
from benchmarks.fault_matrix.load import OK, Load, LoadConfig
from benchmarks.fault_matrix.report import CaseFigures, Span, verdict_tail, write
from benchmarks.loadgen import versions
from mpsserve.config import load_config


@dataclass
class Runner:
    ctx: Context
    load: Load
    status: StatusWatcher
    shown: float = 0.0  # when the last progress line was written

    def failures(self, start: float, end: float) -> list[float]:
        return [o[1] for o in self.load.done_between(start, end) if o[2] != OK]

    def wait_healthy(self, expect: Expect, timeout_s: float) -> tuple[Poll | None, float]:
        """A fresh healthy poll with no failure in the last ``quiet_s``; None at the timeout."""
        start = time.monotonic()
        quiet = self.ctx.args.quiet_s
        while (now := time.monotonic()) - start < timeout_s:
            polls = self.status.since(max(start, now - quiet))
            calm = not self.failures(now - quiet, now)
            if polls and not problems(polls[-1].report, expect) and calm:
                return polls[-1], now
            time.sleep(0.5)
        return None, time.monotonic()

    def window(self, fault: Fault, name: str) -> float:
        """Keep the load on for the window; returns its end."""
        args = self.ctx.args
        end = fault.at + fault.busy_s + args.window_s
        while (now := time.monotonic()) < end + args.max_extra_s:
            if now >= end and self.recovered(fault, now) is not None:
                return now
            self.progress(name, fault, now)
            time.sleep(1.0)
        return time.monotonic()

    def recovered(self, fault: Fault, now: float) -> float | None:
        polls = self.status.since(fault.at)
        failed = self.failures(fault.at, now)
        return recovery_s(polls, fault.expect, failed, fault.at, now, self.ctx.args.quiet_s)

    def progress(self, name: str, fault: Fault, now: float) -> None:
        """A status line on stderr: rewritten in place on a terminal, every 5 s in a log."""
        tty, elapsed = sys.stderr.isatty(), now - fault.at
        if not tty and now - self.shown < 5:
            return
        self.shown = now
        done = self.load.done_between(fault.at, now)
        failed = sum(o[2] != OK for o in done)
        polls = self.status.since(fault.at)
        state = "; ".join(problems(polls[-1].report, fault.expect)) or "healthy" if polls else "?"
        line = f"[{name}] {elapsed:4.0f}s  replies {len(done)}  failed {failed}  {state}"
        sys.stderr.write(f"\r{line[:150]:<150}" if tty else f"{line[:200]}\n")
        sys.stderr.flush()

    def run(self, name: str) -> dict[str, Any]:
        args, ctx = self.ctx.args, self.ctx
        poll, _ = self.wait_healthy(ctx.expect(ctx.reference, version=None), args.settle_timeout_s)
        before = poll.report if poll else self.status.polls[-1].report
        time.sleep(args.baseline_s)
        fault = INJECT[name](ctx, before)
        if isinstance(fault, str):
            return {
                "case": name,
                "verdict": "SKIP",
                "reasons": [fault],
                "settled": poll is not None,
            }
        try:
            end = self.window(fault, name)
        finally:
            fault.finish()
        sys.stderr.write("\n" if sys.stderr.isatty() else "")
        after = replace(fault.expect, rejected=None)  # a removed corrupt version is forgotten
        settled, settled_at = self.wait_healthy(after, args.settle_timeout_s)
        span = Span(name, fault, before, end, settled_at)
        figures = CaseFigures(args, self.load, self.status, span)
        return figures.report(settled is not None, poll is not None)


# ---------------------------------------------------------------------------------------------
# The whole matrix


def meta(args: argparse.Namespace, argv: Sequence[str], url: str) -> dict[str, Any]:
    return {
        "command": shlex.join(["python", "-m", "benchmarks.fault_matrix", *argv]),
        "url": url,
        "config": str(args.config),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": os.uname().nodename,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k.endswith(("_s", "concurrency"))},
    }


FIRST_REPLY_S = 60.0  # beyond --warmup-s, for the first good reply


def start_load(args: argparse.Namespace, url: str, model: str) -> Load:
    infer = f"{url.rstrip('/')}/v2/models/{model}/infer"
    config = LoadConfig(infer, args.rows, args.timeout_s, args.bodies)
    load = Load(config, args.concurrency, args.processes)
    load.start()
    time.sleep(args.warmup_s)
    deadline = time.monotonic() + FIRST_REPLY_S  # a first request can be slow (a cold replica)
    while not any(o[2] == OK for o in load.done_between(0, time.monotonic())):
        if time.monotonic() > deadline:
            load.close()
            raise RuntimeError(
                f"no good reply from {infer} within {args.warmup_s + FIRST_REPLY_S:g}s"
            )
        time.sleep(0.2)
    return load


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Every case in turn; the results file is rewritten after each."""
    config = load_config(args.config)
    model = config.model(args.model) if args.model else config.models[0]
    url = args.url or f"http://127.0.0.1:{config.ingress.http_port}"
    doc: dict[str, Any] = {"meta": meta(args, argv, url), "cases": []}
    status = StatusWatcher(args)
    try:
        first = status.first(90).report
        if not first.get("ingresses") or not model_rows(first, model.name):
            raise RuntimeError(f"status shows no service: {first.get('verdict')}")
        ctx = Context(args, config, model, first)
        load = start_load(args, url, model.name)
        try:
            runner = Runner(ctx, load, status)
            for name in args.cases:
                doc["cases"].append(runner.run(name))
                print(f"{name}: {doc['cases'][-1]['verdict']}{verdict_tail(doc['cases'][-1])}")
                write(args, doc)
        finally:
            for pid in list(ctx.stopped):  # Ctrl-C during a SIGSTOP: never leave a replica frozen
                signal_pid(pid, signal.SIGCONT, "ServeReplica:")
            load.close()
    finally:
        status.close()
    return doc
