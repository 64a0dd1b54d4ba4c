"""Smoke test of the fault matrix (benchmarks/fault_matrix) as an operator runs it: `mpsserve
serve` of a small service, then the tool's publish-new-version and kill-ingress cases with short
windows. Checks that the report carries every figure, that the new version was served and the
ingress kill cost nothing beyond its own connections, never how fast."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.fault_matrix.report import HEADER
from tests.processes import Service, service_config

REPO = Path(__file__).resolve().parents[2]
HTTP = 28700
SHORT = [
    "--cases", "publish-new-version,kill-ingress", "--rows", "200", "--concurrency", "2",
    "--warmup-s", "2", "--baseline-s", "2", "--window-s", "4", "--quiet-s", "1", "--poll-s", "0.5",
    "--max-extra-s", "30", "--settle-timeout-s", "60",
]  # fmt: skip
FIGURES = {
    "requests", "failed", "failed_by_status", "failed_in_flight_at_fault", "failed_after_window",
    "time_to_recover_s", "p99_steady_ms", "p99_window_ms", "versions_served", "version_flips",
    "versions_at_end", "split_at_end", "model_pids_before", "model_pids_after",
    "model_pids_replaced", "graphs_after", "status_timeline", "per_second", "verdict",
}  # fmt: skip


def run_matrix(config: Path, address: str, out: Path) -> subprocess.CompletedProcess[str]:
    tool = [sys.executable, "-m", "benchmarks.fault_matrix", "--config", str(config)]
    files = ["--out", str(out / "fm.json"), "--markdown", str(out / "fm.md")]
    return subprocess.run(
        [*tool, "--address", address, *SHORT, *files],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_publish_and_ingress_kill_cases(tf_store: Path, tmp_path: Path) -> None:
    """A version published and an ingress killed under load: both PASS (two ingresses by
    default, so the kill costs only the requests on the killed one's connections)."""
    store = tmp_path / "store"
    shutil.copytree(tf_store / "1", store / "1")
    config = service_config(store, HTTP, "faultsmoke", poll_interval_s=0.5)
    with Service(tmp_path, config) as svc:
        proc = run_matrix(tmp_path / "service.yaml", svc.address, tmp_path)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}"
    doc = json.loads((tmp_path / "fm.json").read_text())
    assert "benchmarks.fault_matrix" in doc["meta"]["command"]
    cases = {c["case"]: c for c in doc["cases"]}
    assert set(cases) == {"publish-new-version", "kill-ingress"}
    for case in cases.values():
        assert set(case) >= FIGURES, FIGURES - set(case)
        assert case["verdict"] == "PASS", (case["case"], case["reasons"])
        assert case["requests"] > 0 and case["time_to_recover_s"] is not None
    published = cases["publish-new-version"]
    assert published["failed"] == 0 and published["model_pids_replaced"] == []
    assert published["versions_served"].get("2", 0) > 0 and published["versions_at_end"] == ["2"]
    assert (store / "2" / "saved_model.pb").exists()
    killed = cases["kill-ingress"]
    assert killed["failed"] == killed["failed_in_flight_at_fault"]
    assert len(killed["ingress_pids_after"]) == 2
    lines = (tmp_path / "fm.md").read_text().splitlines()
    assert HEADER in lines and any(line.startswith("| kill-ingress |") for line in lines)
