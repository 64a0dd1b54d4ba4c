"""The fault matrix's rules (benchmarks/fault_matrix): what a healthy status report is, when a
case has recovered, its verdict, the slow publish's order. No service: plain status reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.fault_matrix.faults import slow_steps
from benchmarks.fault_matrix.health import Expect, Poll, problems, recovery_s
from benchmarks.fault_matrix.report import markdown_row, verdict


def report(versions: list[str], pids: tuple[int, ...] = (1, 2), **extra: Any) -> dict[str, Any]:
    rows = [
        {"model": "rec", "pid": p, "versions": [v]} for p, v in zip(pids, versions, strict=True)
    ]
    return {"ok": True, "replicas": rows, "ingresses": [{"pid": 9}], **extra}


EXPECT = Expect("rec", replicas=2, ingresses=1, version="1")


def test_healthy_needs_every_replica_on_the_expected_version() -> None:
    assert problems(report(["1", "1"]), EXPECT) == []
    assert problems(report(["1", "2"]), EXPECT) == ["serving ['1', '2']"]
    assert problems(report(["2", "2"]), EXPECT) == ["serving ['2']"]
    assert problems(report(["1"], pids=(1,)), EXPECT) == ["1 replicas, 1 ingresses"]


def test_a_killed_pid_or_an_unrefused_version_is_not_healthy() -> None:
    gone = Expect("rec", 2, 1, "1", gone=frozenset({2}))
    assert problems(report(["1", "1"]), gone) == ["killed pid(s) ['2'] still listed"]
    refused = Expect("rec", 2, 1, "1", rejected="3")
    assert problems(report(["1", "1"]), refused) == ["version 3 not refused yet by [1, 2]"]
    failed = report(["1", "1"])
    for row in failed["replicas"]:
        row["store"] = {"failed": {"3": "cannot load"}}
    assert problems(failed, refused) == []


def test_recovery_is_the_last_healthy_run_after_the_last_failure() -> None:
    polls = [
        Poll(11.0, report(["1"], pids=(1,))),
        Poll(13.0, report(["1", "1"])),
        Poll(15.0, report(["1", "1"])),
    ]
    assert recovery_s(polls, EXPECT, [], t0=10.0, now=30.0, quiet_s=5) == 3.0
    assert recovery_s(polls, EXPECT, [14.5], t0=10.0, now=30.0, quiet_s=5) == 4.5
    assert recovery_s(polls, EXPECT, [], t0=10.0, now=16.0, quiet_s=5) is None  # not calm yet
    broken = [*polls, Poll(17.0, report(["1", "2"]))]
    assert recovery_s(broken, EXPECT, [], t0=10.0, now=30.0, quiet_s=5) is None


def row(case: str, **kw: Any) -> dict[str, Any]:
    base = {
        "case": case,
        "failed": 0,
        "failed_by_status": {},
        "failed_in_flight_at_fault": 0,
        "failed_after_window": 0,
        "split_at_end": False,
        "versions_at_end": ["1"],
        "time_to_recover_s": 4.0,
        "problems_at_end": [],
    }
    return {**base, **kw}


def test_verdict_allows_only_a_killed_ingress_in_flight_requests() -> None:
    assert verdict(row("kill-model-replica")) == ("PASS", [])
    in_flight = {"failed": 2, "failed_by_status": {"ServerDisconnectedError": 2}}
    assert verdict(row("kill-ingress", **in_flight, failed_in_flight_at_fault=2))[0] == "PASS"
    assert verdict(row("kill-model-replica", **in_flight, failed_in_flight_at_fault=2))[0] == "FAIL"
    split = verdict(row("publish-new-version", split_at_end=True, versions_at_end=["1", "2"]))
    assert split == ("FAIL", ["split versions at the end ['1', '2']"])
    assert verdict(row("publish-slow-version", time_to_recover_s=None))[0] == "FAIL"


def test_markdown_row_has_every_column() -> None:
    full = row(
        "publish-new-version",
        requests=10,
        p99_steady_ms=5.0,
        p99_window_ms=6.0,
        versions_served={"10": 3, "9": 7},
        model_pids_replaced=[],
        graphs_after={1: "on", 2: "on"},
        verdict="PASS",
    )
    line = markdown_row(full)
    assert line.count("|") == 11 and "v9: 7, v10: 3" in line and "on: 2" in line


def test_slow_publish_writes_the_graph_first_and_the_weights_last(tmp_path: Path) -> None:
    for name in ("saved_model.pb", "fingerprint.pb", "_SUCCESS"):
        (tmp_path / name).write_text("x")
    (tmp_path / "variables").mkdir()
    steps = slow_steps(tmp_path, "tensorflow", "_SUCCESS")
    assert [[p.name for p in s] for s in steps] == [
        ["saved_model.pb"],
        ["fingerprint.pb", "variables", "_SUCCESS"],
    ]
