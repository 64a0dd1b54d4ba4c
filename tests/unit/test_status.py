"""``mpsserve status``'s verdict and screen, fed hand-built reports (no Ray): versions split
between replicas (converging within the bound, or not), failed versions, CUDA graphs."""

from __future__ import annotations

import json
from typing import Any

from mpsserve.ops.status import _models, _verdict, render

NOW = 1_000_000.0


def replica(
    version: str,
    since_s: float,
    *,
    pid: int,
    model: str = "rec",
    failed: dict[str, str] | None = None,
    bound_s: float | None = 90.0,
    graphs: dict[str, Any] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """A row as ``_replica`` builds it from a replica serving ``version`` for ``since_s``."""
    return {
        "model": model,
        "node": "node-a",
        "host": "10.0.0.1",
        "port": 40000 + pid,
        "pid": pid,
        "versions": [version],
        "device": device,
        "gpus": [],
        "mps": {"mode": "off"},
        "cpu_ops": 0,
        "graphs": graphs,
        "store": {
            "policy": "latest 1",
            "swaps": 0,
            "failed": failed or {},
            "serving_since": NOW - since_s,
            "converge_within_s": bound_s,
        },
    }


def report(*replicas: dict[str, Any], ingresses: int = 2) -> dict[str, Any]:
    """What ``gather`` returns, less the parts only a cluster can give."""
    built: dict[str, Any] = {
        "app": "mpsserve",
        "time": NOW,
        "applications": {
            "mpsserve": {"status": "RUNNING", "message": "", "deployments": {}},
        },
        "ingresses": [{"kind": "ingress", "recent": {}} for _ in range(ingresses)],
        "replicas": list(replicas),
        "traffic": {"window_s": 60, "requests_per_s": 0, "errors": 0, "worst_p99_ms": 0},
        "mps_nodes": {},
        "models": _models(list(replicas), NOW),
    }
    built["ok"], built["verdict"] = _verdict(built)
    return built


def test_replicas_on_one_version_are_ok_without_notes() -> None:
    seen = report(replica("2", 500, pid=1), replica("2", 20, pid=2))
    assert seen["ok"] and seen["verdict"] == "OK: 2 model replica(s) answer, MPS off"
    assert seen["models"]["rec"]["serving"] == {"2": 2} and not seen["models"]["rec"]["split"]
    assert "versions of rec: 2 on 2 replica(s)\n" in render(seen)


def test_a_young_split_is_ok_with_a_converging_note() -> None:
    seen = report(replica("1", 500, pid=1), replica("2", 30, pid=2))
    assert seen["ok"], seen["verdict"]
    assert seen["verdict"].startswith("OK: 2 model replica(s) answer")
    assert seen["verdict"].endswith(
        "; converging: rec split for 30 s of 90 s (1 on 1 replica(s), 2 on 1 replica(s))"
    )
    assert (
        "versions of rec: 1 on 1 replica(s), 2 on 1 replica(s): converging for 30 s (bound 90 s)"
        in render(seen)
    )


def test_a_split_older_than_the_bound_is_a_problem() -> None:
    """The issue's case: a replacement replica loaded a version its survivor never did."""
    seen = report(
        replica("1", 900, pid=1), replica("2", 300, pid=2), replica("2", 200, pid=3, bound_s=150)
    )
    assert not seen["ok"]
    # aged from the most recent change (200 s ago), against the largest bound stated
    assert seen["models"]["rec"]["split_s"] == 200 and seen["models"]["rec"]["bound_s"] == 150
    assert seen["verdict"] == (
        "PROBLEM: rec split across versions for 200 s, past 150 s "
        "(1 on 1 replica(s), 2 on 2 replica(s))"
    )
    assert "versions of rec: 1 on 1 replica(s), 2 on 2 replica(s): SPLIT for 200 s" in render(seen)


def test_the_bound_defaults_when_replicas_do_not_state_it() -> None:
    young = report(replica("1", 900, pid=1, bound_s=None), replica("2", 100, pid=2, bound_s=None))
    old = report(replica("1", 900, pid=1, bound_s=None), replica("2", 130, pid=2, bound_s=None))
    assert young["ok"] and not old["ok"]
    assert old["models"]["rec"]["bound_s"] == 120


def test_a_split_no_replica_can_date_is_a_problem() -> None:
    old, new = replica("1", 10, pid=1), replica("2", 10, pid=2)
    for row in (old, new):
        row["store"]["serving_since"] = None  # a replica from before the field existed
    seen = report(old, new)
    assert not seen["ok"] and "rec split across versions, age unknown" in seen["verdict"]
    assert "SPLIT for ? s" in render(seen)


def test_replicas_that_do_not_answer_are_no_side_of_a_split() -> None:
    silent = {**replica("1", 900, pid=1), "error": "ConnectionRefusedError: refused"}
    for key in ("versions", "store", "graphs"):
        silent.pop(key)
    seen = report(silent, replica("2", 900, pid=2))
    assert not seen["models"]["rec"]["split"]
    assert seen["verdict"] == "PROBLEM: 1 replica(s) do not answer on their data port"


def test_failed_versions_are_listed_without_failing_the_verdict() -> None:
    reason = "ModelLoadError: version 3: saved_model.pb is truncated " + "x" * 200
    seen = report(
        replica("2", 500, pid=1, failed={"3": reason}),
        replica("2", 400, pid=2, failed={"3": "another reason", "4": "no variables"}),
        replica("2", 300, pid=3),
    )
    assert seen["ok"], seen["verdict"]
    assert seen["verdict"].endswith(
        "; rec version(s) failed to load: 3 (2 replica(s)), 4 (1 replica(s))"
    )
    assert seen["models"]["rec"]["failed"] == {
        "3": {"reason": reason, "replicas": 2},
        "4": {"reason": "no variables", "replicas": 1},
    }
    screen = render(seen)
    assert "  failed 3 in 2 replica(s): ModelLoadError: version 3: saved_model.pb" in screen
    assert "  failed 4 in 1 replica(s): no variables" in screen
    assert max(len(line) for line in screen.splitlines()) < 130  # one screen: reasons cut
    assert json.loads(json.dumps(seen))["models"]["rec"]["failed"]["3"]["reason"] == reason


def test_each_model_is_judged_on_its_own() -> None:
    seen = report(
        replica("1", 900, pid=1),
        replica("1", 900, pid=2),
        replica("7", 900, pid=3, model="rec-b"),
        replica("8", 10, pid=4, model="rec-b"),
    )
    assert seen["ok"] and "converging: rec-b split for 10 s of 90 s" in seen["verdict"]
    assert list(seen["models"]) == ["rec", "rec-b"] and not seen["models"]["rec"]["split"]


def test_one_ingress_and_graphs_turned_off_are_noted() -> None:
    graphs_on = {"enabled": True, "graphs": 12, "captures": 12, "eager_buckets": 0}
    graphs_off = {"enabled": False, "graphs": 0, "captures": 3, "eager_buckets": 0}
    seen = report(
        replica("2", 900, pid=1, graphs=graphs_on, device="gpu"),
        replica("2", 900, pid=2, graphs=graphs_off, device="gpu"),
        ingresses=1,
    )
    assert seen["ok"]
    assert seen["verdict"] == (
        "OK: 2 model replica(s) answer, MPS off; 1 ingress answers: a single point of "
        "failure; CUDA graphs off in 1 of 2 replica(s)"
    )
    rows = {line.split()[3]: line for line in render(seen).splitlines() if line.startswith("rec ")}
    assert " on 12 " in rows["1"] and " off " in rows["2"]


def test_the_screen_shows_every_nodes_metrics_port() -> None:
    seen = report(replica("2", 500, pid=1))
    seen["metrics"] = ["http://10.0.0.5:8002/metrics", "http://10.0.0.6:8002/metrics"]
    assert "metrics: http://10.0.0.5:8002/metrics, http://10.0.0.6:8002/metrics\n" in render(seen)
    seen["metrics"] = []
    assert "metrics: off (ingress.metrics_port: null)\n" in render(seen)
